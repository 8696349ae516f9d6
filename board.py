"""The board: the kit's whole workflow in a local web page, one tab per step (Train, Evaluate, Export, Chat).

    python board.py                          # http://127.0.0.1:7860
    python board.py --port 8080 --runs runs
    make board

It runs the scripts exactly as you would (train.py, eval.py, merge.py, infer.py; each command is shown) and reads
what they write in the run folder; it never trains in its own process. A training run is started detached with
its output in <run>/train.log: close the page or stop the board and it goes on; the Train tab finds it again.
"""

import json
from functools import partial
from pathlib import Path

import click

import recipes
from kit import board_runs as runs
from kit.board_form import SECTIONS, as_text, read_form, start_recipe
from kit.gguf import CONVERTER_TYPES, QUANTIZER_TYPES
from recipes.base import BASE

SYSTEMS = ("base", "base+prompt", "finetuned")


def train_command(root: Path, start, run_name, config_path, overrides, *extra) -> list[str]:
    if start == "base":  # no recipe by that name: only a config file can start from base
        if not config_path:
            raise recipes.RecipeError("a form that starts from base runs from a config file: Save config first")
        return runs.command("train.py", "--config", config_path, "--output", root / run_name, *extra)
    sets = [part for item in overrides for part in ("--set", item)]
    return runs.command("train.py", "--recipe", start, *sets, "--output", root / run_name, *extra)


def field(key, value):
    """A form field typed like the key's default: a checkbox, a choice, or text read as --set reads it."""
    import gradio as gr

    info = f"default {as_text(BASE[key])!s:.40}"
    if isinstance(BASE[key], bool):
        return gr.Checkbox(value, label=key, info=info, elem_id=f"field-{key}")
    if key in recipes.CHOICES:
        return gr.Dropdown(list(recipes.CHOICES[key]), value=value, label=key, info=info, elem_id=f"field-{key}")
    return gr.Textbox(as_text(value), label=key, info=info, max_lines=1, elem_id=f"field-{key}")


def build(root: Path):
    """The page: one tab per step, each reading the run folders under `root`."""
    import gradio as gr

    with gr.Blocks(title="qwen2vl-kit board") as board:
        gr.Markdown("# qwen2vl-kit board\nEach button runs the kit's scripts as you would; the command is shown.")
        with gr.Tabs():
            train_tab(board, root)
            evaluate_tab(root)
            export_tab(root)
            chat_tab(root)
    return board


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


def plan_run(root: Path, start_name, name, config, *values):
    """Plan: train.py --plan on the form, shown from the plan.json it writes."""
    import gradio as gr

    overrides, updates, note = checked(start_name, values)
    if overrides is None:
        return *updates, note, gr.update()
    cmd = train_command(root, start_name, name, config, overrides, "--plan")
    for output, code in runs.stream(cmd):
        pass
    found = runs.read_json(root / name / "plan.json") if code == 0 else None
    shown = runs.plan_text(found) if found else output  # a failed plan: what train.py said, as in a shell
    return *updates, f"`{runs.shown(cmd)}` exit {code}", gr.update(value=shown, visible=True)


def export_run(root: Path, name, chosen_targets, chosen_quants, force):
    """Export: merge.py's output as it comes, then what it proved, from the export.json it writes."""
    cmd = runs.command("merge.py", root / name, "--to", ",".join(chosen_targets), "--quant",
                       ",".join(chosen_quants), *(["--force"] if force else []))
    for output, code in runs.stream(cmd):
        yield f"$ {runs.shown(cmd)}\n{output}", "", ""
    written = runs.read_json(root / name / "export.json") if code == 0 else None
    if written is None:
        yield f"$ {runs.shown(cmd)}\n{output}", f"**merge.py failed (exit {code})**: see its output above", ""
        return
    # beside what merge.py proved: eval.py's scores of the exports, when the run's evaluation compared them
    yield f"$ {runs.shown(cmd)}\n{output}", *runs.export_view(written, runs.read_json(root / name / "eval" /
                                                                                      "report.json"))


def train_tab(board, root: Path):
    """Train: the recipe form; Plan, Save config, Start, Stop, Resume; progress and the runs under `root`."""
    import gradio as gr

    with gr.Tab("Train"):
        with gr.Row():
            start = gr.Dropdown(["base", *recipes.names()], value="demo", label="Start from recipe")
            upload = gr.File(label="...or load a config file (.json / .yaml)", file_types=[".json", ".yaml",
                             ".yml"], type="filepath", height=90, elem_id="config-upload")
            run_name = gr.Textbox("demo", label="Run folder name (under runs/)", elem_id="run-name")
            config_path = gr.Textbox(str(root / "demo.yaml"), label="Config file to save")
        fields, sections, section = {}, {}, "Model"
        for key in BASE:  # the keys of each part of recipes/base.py, in its order
            section = SECTIONS.get(key) or section
            sections.setdefault(section, []).append(key)
        for section, keys in sections.items():
            with gr.Accordion(section, open=section != "LoRA"):
                for row in range(0, len(keys), 4):
                    with gr.Row():
                        for key in keys[row:row + 4]:
                            fields[key] = field(key, start_recipe("demo")[key])
        with gr.Row(elem_id="train-buttons"):
            plan_button, save_button = gr.Button("Plan"), gr.Button("Save config")
            start_button = gr.Button("Start", variant="primary")
            stop_button, resume_button = gr.Button("Stop"), gr.Button("Resume")
        status = gr.Markdown(elem_id="train-status")
        with gr.Row():
            log = gr.Textbox(label="Progress (train.log)", lines=14, max_lines=14, autoscroll=True,
                             elem_id="train-log")
            loss = gr.Image(label="Training loss (metrics.jsonl)", elem_id="loss-plot", height=330)
        with gr.Row():
            watched = gr.Dropdown(runs.run_names(root), label="Run to watch, stop or resume",
                                  allow_custom_value=True, elem_id="watched")
            runs_view = gr.Dataframe(runs_table(root), headers=["run", "state", "step", "loss", "updated"],
                                     label="Runs under " + str(root), interactive=False, elem_id="runs")
        plan_out = gr.Textbox(label="Plan (train.py --plan)", lines=12, visible=False, elem_id="plan")
        timer, seen = gr.Timer(2), gr.State()  # a tick redraws the progress; seen: what it last drew

    field_list = list(fields.values())

    def set_start(name):
        values = start_recipe(name)
        return [gr.update(value=as_text(values[k]) if not isinstance(values[k], bool) else values[k])
                for k in BASE] + [name, str(root / f"{name}.yaml")]

    def load_file(path):
        if not path:
            return [gr.update()] * (len(BASE) + 3) + [""]
        try:
            recipe, _, name = recipes.load_config(Path(path), [], Path(path).name)
        except recipes.RecipeError as error:
            return [gr.update()] * (len(BASE) + 3) + [f"**{error}**"]
        return ([gr.update(value=recipe[k] if isinstance(recipe[k], bool) else as_text(recipe[k]))
                 for k in BASE] + [name, Path(path).stem, str(root / Path(path).with_suffix(".yaml").name)]
                + [f"loaded {Path(path).name} (starts from {name})"])

    def load_run(name):
        """A run picked by hand: its run_config.json replayed into the form (to change and start anew)."""
        if not name or not (root / name / "run_config.json").exists():
            return [gr.update()] * (len(BASE) + 4)
        *fields_, start_name, _, _, note = load_file(str(root / name / "run_config.json"))
        return [*fields_, start_name, f"{name}-2", str(root / f"{name}-2.yaml"), note]

    def save(start_name, name, config, *values):
        overrides, updates, note = checked(start_name, values)
        if overrides is None:
            return *updates, note
        import yaml

        settings = dict(item.split("=", 1) for item in overrides)
        recipe = recipes.load_config({"recipe": start_name}, overrides)[0]
        target = Path(config)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(yaml.safe_dump({"recipe": start_name, **{k: recipe[k] for k in settings}},
                                         sort_keys=False))
        shown = runs.shown(runs.command("train.py", "--config", target, "--output", root / name))
        return *updates, f"wrote {target}; run it with:\n\n```\n{shown}\n```"

    def start_run(start_name, name, config, *values):
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

    def stop_run(name):
        if name and runs.stop_training(root / name):
            return f"sent SIGTERM to {name}: it saves a checkpoint after this step, then stops"
        return f"{name or 'no run'} is not running"

    def resume_run(name):
        if not name or not (root / name / "run_config.json").exists():
            return "pick a run to resume"
        if runs.training_pid(root / name):
            return f"{name} is already running"
        cmd = runs.command("train.py", "--resume", root / name)
        return f"resumed (pid {runs.start_training(cmd, root / name)}):\n\n```\n{runs.shown(cmd)}\n```"

    def watch(name, seen):
        """Redraw only what changed since the last tick (the page stays responsive while it waits)."""
        table = runs_table(root)
        log_file = runs.log_path(root / name) if name else None
        now = (name, log_file.stat().st_size if log_file and log_file.exists() else 0, str(table))
        if now == seen:
            return gr.skip(), gr.skip(), gr.skip(), seen
        if not name:
            return "", None, table, now
        return runs.tail(log_file, 14), runs.loss_plot(root / name), table, now  # what the box shows

    form = [start, run_name, config_path, *field_list]
    start.input(set_start, start, [*field_list, run_name, config_path])
    run_name.input(lambda name: str(root / f"{name}.yaml"), run_name, config_path)
    upload.upload(load_file, upload, [*field_list, start, run_name, config_path, status])
    plan_button.click(partial(plan_run, root), form, [*field_list, status, plan_out])
    save_button.click(save, form, [*field_list, status])
    start_button.click(start_run, form, [*field_list, status, watched])
    stop_button.click(stop_run, watched, status)
    watched.input(load_run, watched, [*field_list, start, run_name, config_path, status])
    resume_button.click(resume_run, watched, status)
    timer.tick(watch, [watched, seen], [log, loss, runs_view, seen])
    board.load(partial(refresh_choices, root), watched, watched)  # a reopened page shows the newest run


def evaluate_tab(root: Path):
    """Evaluate: eval.py on a run; its report.md, report.png and a few rows of predictions.jsonl."""
    import gradio as gr

    with gr.Tab("Evaluate") as tab:
        with gr.Row():
            eval_run = gr.Dropdown(runs.run_names(root), label="Run", elem_id="eval-run")
            systems = gr.CheckboxGroup(list(SYSTEMS), value=["base", "finetuned"], label="Systems")
            shuffled = gr.Checkbox(label="Also with each question shown another chart (--control shuffled)")
            limit = gr.Number(0, precision=0, label="Questions (0 = all)", elem_id="eval-limit")
            eval_force = gr.Checkbox(label="Replace an existing evaluation")
        eval_button = gr.Button("Evaluate", variant="primary")
        eval_log = gr.Textbox(label="eval.py", lines=8, max_lines=8, autoscroll=True, elem_id="eval-log")
        report = gr.Markdown(elem_id="eval-report")
        with gr.Row():
            report_png = gr.Image(label="report.png", height=300)
            answers = gr.Dataframe(headers=["question", "references", "system", "answer", "relaxed"],
                                   label="A few answers (predictions.jsonl)", elem_id="eval-answers")

    def evaluate(name, chosen, control, count, force):
        cmd = runs.command("eval.py", root / name, "--compare", ",".join(chosen), "--limit", int(count or 0),
                           *(["--control", "shuffled"] if control else []), *(["--force"] if force else []))
        for output, code in runs.stream(cmd):
            yield f"$ {runs.shown(cmd)}\n{output}", "", None, None
        out = root / name / "eval"
        if code or not (out / "report.md").exists():
            return
        rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()[:4]]
        table = [[r["question"], ", ".join(r["references"]), system, result["answer"], result["relaxed"]]
                 for r in rows for system, result in r["systems"].items()]
        yield f"$ {runs.shown(cmd)}\n{output}", (out / "report.md").read_text(), str(out / "report.png"), table

    eval_button.click(evaluate, [eval_run, systems, shuffled, limit, eval_force],
                      [eval_log, report, report_png, answers])
    tab.select(partial(refresh_choices, root), eval_run, eval_run)


def export_tab(root: Path):
    """Export: merge.py on a run; what it proved, from the run's export.json."""
    import gradio as gr

    with gr.Tab("Export") as tab:
        with gr.Row():
            run_choice = gr.Dropdown(runs.run_names(root), label="Run", elem_id="export-run")
            targets = gr.CheckboxGroup(["merged", "gguf"], value=["merged", "gguf"], label="Write")
            quants = gr.CheckboxGroup([*CONVERTER_TYPES, *QUANTIZER_TYPES], value=["f16"],
                                      label="GGUF types (--quant)")
            export_force = gr.Checkbox(label="Replace existing exports")
        export_button = gr.Button("Export", variant="primary")
        export_log = gr.Textbox(label="merge.py", lines=10, max_lines=10, autoscroll=True,
                                elem_id="export-log")
        parity = gr.Markdown(elem_id="export-parity")
        llama_commands = gr.Code(label="Run it in llama.cpp", language="shell", elem_id="export-commands")

    export_button.click(partial(export_run, root), [run_choice, targets, quants, export_force],
                        [export_log, parity, llama_commands])
    tab.select(partial(refresh_choices, root), run_choice, run_choice)


def chat_tab(root: Path):
    """Chat: infer.py --stream on a run, a merged folder or a GGUF folder."""
    import gradio as gr

    with gr.Tab("Chat") as tab:
        with gr.Row():
            with gr.Column():
                chat_target = gr.Dropdown(runs.chat_targets(root), elem_id="chat-target",
                                          label="Model: a run, a merged folder or a GGUF folder")
                image = gr.Image(type="filepath", label="Chart", height=260, elem_id="chat-image")
            with gr.Column():
                question = gr.Textbox(label="Question", elem_id="chat-question")
                ask = gr.Button("Ask", variant="primary")
                answer = gr.Textbox(label="Answer (streamed from infer.py --stream)", lines=4,
                                    elem_id="chat-answer")
                chat_command = gr.Markdown(elem_id="chat-command")

    def chat(target, picture, text):
        if not (target and picture and text):
            yield "pick a model, upload a chart and write a question", ""
            return
        cmd = runs.command("infer.py", target, "--image", picture, "--question", text, "--stream")
        for output, code in runs.stream(cmd, chars=True):
            ended = "answering..." if code is None else "(finished)" if code == 0 else f"(failed, exit {code})"
            yield output.strip(), f"```\n{runs.shown(cmd)}\n```\n{ended}"

    ask.click(chat, [chat_target, image, question], [answer, chat_command])
    tab.select(lambda current: gr.Dropdown(choices=runs.chat_targets(root), value=current),
                    chat_target, chat_target)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--host", default="127.0.0.1", help="Address to listen on; 0.0.0.0 shares the board with your network.")
@click.option("--port", default=7860, help="Port to listen on.")
@click.option("--runs", "runs_root", default="runs", type=click.Path(path_type=Path),
              help="Folder holding the run folders (train.py's default).")
def main(host, port, runs_root):
    """Open the board (train, evaluate, export, chat) in your browser at http://HOST:PORT.

    \b
        python board.py                          # http://127.0.0.1:7860
        python board.py --port 8080 --runs runs  # another port, another runs folder
    """
    root = runs_root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    build(root).queue().launch(server_name=host, server_port=port, allowed_paths=[str(root)], show_error=True)


if __name__ == "__main__":
    main()
