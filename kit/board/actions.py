"""What the board's buttons do: each handler takes the runs folder first (the board binds it) and the form's
values, runs a script as a user would (the command is shown) and reads back the files it writes. board.py lays
the page out and wires these in; gradio is imported inside, after the board has started."""

import json
from collections import deque
from pathlib import Path

import recipes
from kit.board import runs
from kit.board.form import as_text, read_form, start_recipe
from recipes.base import BASE


def train_command(root: Path, start, run_name, config_path, overrides, *extra) -> list[str]:
    if start == "base":  # no recipe by that name: only a config file can start from base
        if not config_path:
            raise recipes.RecipeError("a form that starts from base runs from a config file: Save config first")
        return runs.command("train.py", "--config", config_path, "--output", root / run_name, *extra)
    sets = [part for item in overrides for part in ("--set", item)]
    return runs.command("train.py", "--recipe", start, *sets, "--output", root / run_name, *extra)


def refresh_choices(root: Path, current=None):
    """A run dropdown's choices, keeping the current run when it is still there."""
    import gradio as gr

    names = runs.run_names(root)
    return gr.Dropdown(choices=names, value=current if current in names else (names[0] if names else None))


def runs_table(root: Path) -> list[list]:
    return [[r["run"], r["state"], r["step"], r["loss"], r["updated"]] for r in runs.runs(root)]


def checked(start_name, values):
    """(overrides, a gr.update per field showing its error, the status line)."""
    import gradio as gr

    overrides, errors = read_form(start_name, values)
    updates = [gr.update(info=f"⚠ {errors[k]}" if k in errors else f"default {as_text(BASE[k])!s:.40}")
               for k in BASE]
    note = "**Fix the fields marked ⚠**" + (f": {errors['']}" if "" in errors else "") if errors else ""
    return (None if errors else overrides), updates, note


# --- Train -----------------------------------------------------------------------------------------------------
def set_start(root: Path, name):
    import gradio as gr

    values = start_recipe(name)
    return [gr.update(value=as_text(values[k]) if not isinstance(values[k], bool) else values[k])
            for k in BASE] + [name, str(root / f"{name}.yaml")]


def load_file(root: Path, path):
    import gradio as gr

    if not path:
        return [gr.update()] * (len(BASE) + 3) + [""]
    try:
        recipe, _, name = recipes.load_config(Path(path), [], Path(path).name)
    except recipes.RecipeError as error:
        return [gr.update()] * (len(BASE) + 3) + [f"**{error}**"]
    return ([gr.update(value=recipe[k] if isinstance(recipe[k], bool) else as_text(recipe[k]))
             for k in BASE] + [name, Path(path).stem, str(root / Path(path).with_suffix(".yaml").name)]
            + [f"loaded {Path(path).name} (starts from {name})"])


def load_run(root: Path, name):
    """A run picked by hand: its run_config.json replayed into the form (to change and start anew)."""
    import gradio as gr

    if not name or not (root / name / "run_config.json").exists():
        return [gr.update()] * (len(BASE) + 4)
    *fields, start_name, _, _, note = load_file(root, str(root / name / "run_config.json"))
    return [*fields, start_name, f"{name}-2", str(root / f"{name}-2.yaml"), note]


def plan_run(root: Path, start_name, name, config, *values):
    """Plan: train.py --plan on the form, shown from the plan.json it writes."""
    import gradio as gr

    overrides, updates, note = checked(start_name, values)
    if overrides is None:
        return *updates, note, gr.update()
    cmd = train_command(root, start_name, name, config, overrides, "--plan")
    [(output, code)] = deque(runs.stream(cmd), maxlen=1)  # train.py --plan runs to its end; its last state
    found = runs.read_json(root / name / "plan.json") if code == 0 else None
    shown = runs.plan_text(found) if found else output  # a failed plan: what train.py said, as in a shell
    return *updates, f"`{runs.shown(cmd)}` exit {code}", gr.update(value=shown, visible=True)


def save_config(root: Path, start_name, name, config, *values):
    import yaml

    overrides, updates, note = checked(start_name, values)
    if overrides is None:
        return *updates, note
    settings = dict(item.split("=", 1) for item in overrides)
    recipe = recipes.load_config({"recipe": start_name}, overrides)[0]
    target = Path(config)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(yaml.safe_dump({"recipe": start_name, **{k: recipe[k] for k in settings}}, sort_keys=False))
    shown = runs.shown(runs.command("train.py", "--config", target, "--output", root / name))
    return *updates, f"wrote {target}; run it with:\n\n```\n{shown}\n```"


def start_run(root: Path, start_name, name, config, *values):
    import gradio as gr

    overrides, updates, note = checked(start_name, values)
    if overrides is None:
        return *updates, note, gr.update()
    if runs.holds_run(root / name):
        return *updates, f"**runs/{name} already holds a run**: Resume it or pick another name", name
    try:
        cmd = train_command(root, start_name, name, config, overrides)
    except recipes.RecipeError as error:
        return *updates, f"**{error}**", gr.update()
    pid = runs.start_training(cmd, root / name)
    return *updates, f"started (pid {pid}):\n\n```\n{runs.shown(cmd)}\n```", name


def stop_run(root: Path, name):
    if name and runs.stop_training(root / name):
        return f"sent SIGTERM to {name}: it saves a checkpoint after this step, then stops"
    return f"{name or 'no run'} is not running"


def resume_run(root: Path, name):
    if not name or not (root / name / "run_config.json").exists():
        return "pick a run to resume"
    if runs.training_pid(root / name):
        return f"{name} is already running"
    cmd = runs.command("train.py", "--resume", root / name)
    return f"resumed (pid {runs.start_training(cmd, root / name)}):\n\n```\n{runs.shown(cmd)}\n```"


def watch(root: Path, name, seen):
    """Redraw only what changed since the last tick (the page stays responsive while it waits)."""
    import gradio as gr

    table = runs_table(root)
    log_file = runs.log_path(root / name) if name else None
    now = (name, log_file.stat().st_size if log_file and log_file.exists() else 0, str(table))
    if now == seen:
        return gr.skip(), gr.skip(), gr.skip(), seen
    if not name:
        return "", None, table, now
    return runs.tail(log_file, 14), runs.loss_plot(root / name), table, now  # what the box shows


# --- Evaluate, Export, Chat ------------------------------------------------------------------------------------
def evaluate_run(root: Path, name, chosen, control, count, force):
    """Evaluate: eval.py's output as it comes, then its report.md, report.png and a few answers."""
    cmd = runs.command("eval.py", root / name, "--compare", ",".join(chosen), "--limit", int(count or 0),
                       *(["--control", "shuffled"] if control else []), *(["--force"] if force else []))
    output, code = "", None
    for output, code in runs.stream(cmd):  # noqa: B007  (the last output and exit code are read after the loop)
        yield f"$ {runs.shown(cmd)}\n{output}", "", None, None
    out = root / name / "eval"
    if code or not (out / "report.md").exists():
        return
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()[:4]]
    first = json.loads((out / "report.json").read_text())["key"]  # the task's metric: relaxed, cer, anls...
    table = [[r["question"], ", ".join(r["references"]), system, result["answer"], result[first]]
             for r in rows for system, result in r["systems"].items()]
    yield f"$ {runs.shown(cmd)}\n{output}", (out / "report.md").read_text(), str(out / "report.png"), table


def export_run(root: Path, name, chosen_targets, chosen_quants, force):
    """Export: merge.py's output as it comes, then what it proved, from the export.json it writes."""
    cmd = runs.command("merge.py", root / name, "--to", ",".join(chosen_targets), "--quant",
                       ",".join(chosen_quants), *(["--force"] if force else []))
    output, code = "", None
    for output, code in runs.stream(cmd):  # noqa: B007  (the last output and exit code are read after the loop)
        yield f"$ {runs.shown(cmd)}\n{output}", "", ""
    written = runs.read_json(root / name / "export.json") if code == 0 else None
    if written is None:
        yield f"$ {runs.shown(cmd)}\n{output}", f"**merge.py failed (exit {code})**: see its output above", ""
        return
    # beside what merge.py proved: eval.py's scores of the exports, when the run's evaluation compared them
    report = runs.read_json(root / name / "eval" / "report.json")
    yield f"$ {runs.shown(cmd)}\n{output}", *runs.export_view(written, report)


def chat_answer(target, picture, text):
    """Chat: infer.py --stream's answer as it comes, and the command that gave it."""
    if not (target and picture and text):
        yield "pick a model, upload a chart and write a question", ""
        return
    cmd = runs.command("infer.py", target, "--image", picture, "--question", text, "--stream")
    for output, code in runs.stream(cmd, chars=True):
        ended = "answering..." if code is None else "(finished)" if code == 0 else f"(failed, exit {code})"
        yield output.strip(), f"```\n{runs.shown(cmd)}\n```\n{ended}"


def chat_choices(root: Path, current):
    import gradio as gr

    return gr.Dropdown(choices=runs.chat_targets(root), value=current)
