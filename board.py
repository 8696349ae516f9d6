"""The board: the kit's whole workflow in a local web page, one tab per step (Train, Evaluate, Export, Chat).

    python board.py                          # http://127.0.0.1:7860
    python board.py --port 8080 --runs runs
    make board

It runs the scripts exactly as you would (train.py, eval.py, merge.py, infer.py; each command is shown) and reads
what they write in the run folder; it never trains in its own process. A training run is started detached with
its output in <run>/train.log: close the page or stop the board and it goes on; the Train tab finds it again.
"""

from functools import partial
from pathlib import Path

import click

import recipes
from kit.board import actions, runs
from kit.board.form import SECTIONS, as_text, start_recipe
from kit.export.gguf import CONVERTER_TYPES, QUANTIZER_TYPES
from recipes.base import BASE

SYSTEMS = ("base", "base+prompt", "finetuned")


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


def recipe_form(root: Path) -> dict:
    """The Train tab's top: where the recipe comes from, and one field per recipe key, by section."""
    import gradio as gr

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
    return dict(start=start, upload=upload, run_name=run_name, config_path=config_path,
                fields=list(fields.values()))


def train_tab(board, root: Path):
    """Train: the recipe form; Plan, Save config, Start, Stop, Resume; progress and the runs under `root`."""
    import gradio as gr

    with gr.Tab("Train"):
        form = recipe_form(root)
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
            runs_view = gr.Dataframe(actions.runs_table(root), headers=["run", "state", "step", "loss", "updated"],
                                     label="Runs under " + str(root), interactive=False, elem_id="runs")
        plan_out = gr.Textbox(label="Plan (train.py --plan)", lines=12, visible=False, elem_id="plan")
        timer, seen = gr.Timer(2), gr.State()  # a tick redraws the progress; seen: what it last drew

    fields, start, run_name, config_path = form["fields"], form["start"], form["run_name"], form["config_path"]
    inputs, named = [start, run_name, config_path, *fields], [*fields, start, run_name, config_path]
    start.input(partial(actions.set_start, root), start, [*fields, run_name, config_path])
    run_name.input(lambda name: str(root / f"{name}.yaml"), run_name, config_path)
    form["upload"].upload(partial(actions.load_file, root), form["upload"], [*named, status])
    plan_button.click(partial(actions.plan_run, root), inputs, [*fields, status, plan_out])
    save_button.click(partial(actions.save_config, root), inputs, [*fields, status])
    start_button.click(partial(actions.start_run, root), inputs, [*fields, status, watched])
    stop_button.click(partial(actions.stop_run, root), watched, status)
    watched.input(partial(actions.load_run, root), watched, [*named, status])
    resume_button.click(partial(actions.resume_run, root), watched, status)
    timer.tick(partial(actions.watch, root), [watched, seen], [log, loss, runs_view, seen])
    board.load(partial(actions.refresh_choices, root), watched, watched)  # a reopened page shows the newest run


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
            answers = gr.Dataframe(headers=["question", "references", "system", "answer", "verdict"],
                                   label="A few answers (predictions.jsonl)", elem_id="eval-answers")

    eval_button.click(partial(actions.evaluate_run, root), [eval_run, systems, shuffled, limit, eval_force],
                      [eval_log, report, report_png, answers])
    tab.select(partial(actions.refresh_choices, root), eval_run, eval_run)


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

    export_button.click(partial(actions.export_run, root), [run_choice, targets, quants, export_force],
                        [export_log, parity, llama_commands])
    tab.select(partial(actions.refresh_choices, root), run_choice, run_choice)


def chat_tab(root: Path):
    """Chat: infer.py --stream on a run, a merged folder or a GGUF folder."""
    import gradio as gr

    with gr.Tab("Chat") as tab, gr.Row():
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

    ask.click(actions.chat_answer, [chat_target, image, question], [answer, chat_command])
    tab.select(partial(actions.chat_choices, root), chat_target, chat_target)


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
