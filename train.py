"""Fine-tune Qwen2-VL on charts: 4-bit QLoRA through Unsloth on a GPU, or plain transformers + peft.

    python train.py --recipe chartqa                          # Qwen2-VL-7B QLoRA, fits a 24 GB GPU
    python train.py --recipe demo                             # tiny model, synthetic charts, CPU, ~1-2 min
    python train.py --recipe demo --set max_steps=100 --output runs/quick
    python train.py --resume runs/chartqa                     # continue from the last checkpoint
    python train.py --config my.yaml --set max_steps=50       # a JSON/YAML dict of recipe keys (+ "recipe")

Writes into the run folder: run_config.json (resolved recipe, versions), the adapter (or the whole model
for finetune=full) with the processor, checkpoints/, metrics.jsonl and loss.png.
"""

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import click

from kit.cli import help_with_examples, user_errors
from kit.errors import UserError
from kit.paths import write_json
from kit.plan import survey
from kit.train import distributed, runfolder


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--recipe", help="Recipe name from recipes/ (chartqa, chartqa_2b, chartqa_qwen25vl_7b, latex_ocr, "
              "demo, ...).")
@click.option("--config", "config", type=click.Path(path_type=Path),
              help="JSON/YAML file of recipe keys, with \"recipe\": NAME to start from (default base); "
                   "a run's run_config.json replays that run. Default run folder: runs/<file name>.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe key, typed like its default; repeatable.")
@click.option("--output", type=click.Path(path_type=Path), help="Run folder. Default: runs/<recipe>.")
@click.option("--backend", type=click.Choice(["auto", "unsloth", "hf"]),
              help="Override the recipe's backend (auto picks unsloth when CUDA and unsloth are present).")
@click.option("--resume", "resume_dir", type=click.Path(path_type=Path),
              help="Continue the run in this folder from its last complete checkpoint.")
@click.option("--force", is_flag=True,
              help="Replace an existing run folder (kept aside until the new run has taken its first step, "
                   "and put back if it fails before); start even if the plan says it won't fit.")
@click.option("--plan", "plan_only", is_flag=True, help="Check the data and estimate tokens and memory; no training.")
@click.option("--plan-samples", type=int, default=0, help="With --plan: look at only this many rows (0 = all).")
@click.option("--gpu", help="Plan for this card instead of the one present: its memory (12GB, 16GB, 11.5GB) or its "
              "name (T4, L4, A10G, A100, H100, ...); N x it for N GPUs (4x24GB, or 4x for 4 of the card present).")
@click.option("--on-bad-row", type=click.Choice(["fail", "skip"]), default="fail",
              help="A row that lint finds broken or too long: stop, or leave it out (listed in skipped.jsonl).")
def main(**options):
    """Fine-tune Qwen2-VL with a recipe or a config file."""
    with runfolder.restore_on_failure(), user_errors():
        run(Options(**options))


@dataclass(frozen=True)
class Options:
    """The command line, named as its options are (what run() takes)."""
    recipe: str | None = None
    config: Path | None = None
    overrides: tuple[str, ...] = ()
    output: Path | None = None
    backend: str | None = None
    resume_dir: Path | None = None
    force: bool = False
    plan_only: bool = False
    plan_samples: int = 0
    gpu: str | None = None
    on_bad_row: str = "fail"


@dataclass
class Setup:
    """What the command line resolves to before anything loads: the recipe and where the run lives."""
    recipe: dict
    recipe_name: str
    changes: list
    config: dict | None
    run_dir: Path
    resumed: dict | None = None  # run_config.json of the run --resume continues
    backend: str = ""
    precision: str = ""


def run(options: Options):
    from kit import backend as backends
    from kit.noise import silence_known_noise

    silence_known_noise()
    distributed.prepare()
    # --- setup: options -> recipe, backend, data, plan -----------------------------------------------------
    setup = resolve(options)
    show_recipe(setup)
    setup.backend, reason = backends.select(setup.recipe["backend"])
    setup.precision = backends.precision(setup.recipe["precision"], setup.backend)
    click.echo(f"backend {setup.backend} ({reason}); precision {setup.precision}")
    distributed.init(setup.recipe)
    check_4bit_here(setup.recipe, options)
    loaded = survey.survey(setup, options)
    if options.plan_only:
        return survey.write_plan(setup, loaded)
    survey.check_fits(loaded, options.force)
    train_samples, eval_questions = prepare_run_folder(setup, loaded, options)

    # --- train ---------------------------------------------------------------------------------------------
    from kit.train import method as methods

    method = methods.for_recipe(setup.recipe)
    model, processor = load_model(method, setup, loaded)
    collator = method.collator(model, processor, setup.recipe)
    trainer = method.trainer(setup.recipe, setup.precision, setup.backend, setup.run_dir / "checkpoints", model,
                             processor, collator, train_samples, eval_questions, loaded["family"])
    started = time.time()
    steps_done, resumed_at = train(trainer, collator, setup, options)

    # --- save ----------------------------------------------------------------------------------------------
    save(trainer, processor, setup.run_dir, steps_done, resumed_at, time.time() - started)


def resolve(options: Options) -> Setup:
    """The recipe from --recipe, --config or a run being resumed, with --set and --backend on top; the run folder,
    refused when it already holds a run and neither --resume nor --force says what to do with it."""
    import recipes
    from kit.train import grpo

    recipe_name, overrides, config = options.recipe, list(options.overrides), options.config
    if options.resume_dir:
        from kit.run_checks import read_run_config

        saved = read_run_config(options.resume_dir)
        recipe_name, overrides = saved["recipe_name"], list(saved["overrides"]) + overrides
        config, config_label = saved.get("config"), f"{options.resume_dir / 'run_config.json'} (config)"
    elif recipe_name and config:
        raise UserError("give --recipe NAME or --config FILE, not both (a config names its recipe as \"recipe\")")
    elif config:
        config_label, config = str(config), recipes.read_config(config)
    elif not recipe_name:
        raise UserError(f"give --recipe NAME (one of: {', '.join(recipes.names())}), --config FILE "
                        "or --resume RUN_DIR")
    if options.backend:
        overrides.append(f"backend={options.backend}")
    if config is not None:
        recipe, changes, recipe_name = recipes.load_config(config, overrides, config_label)
    else:
        recipe, changes = recipes.load(recipe_name, overrides)
    recipe, inherited = grpo.prepare(recipe)  # method=grpo: the model keys of the run it starts from
    changes = [(key, old, new, "") for key, old, new in changes] + [
        (key, old, new, f"init_from: as {recipe['init_from']} was trained") for key, old, new in inherited]
    if options.gpu:
        from kit.plan.estimate import gpu_count, named_gpu

        card = gpu_count(options.gpu)[1]
        if card:
            named_gpu(card)  # a mistyped --gpu is refused before any data loads
    return Setup(recipe, recipe_name, changes, config, options.resume_dir or new_run_dir(options, recipe_name),
                 saved if options.resume_dir else None)


def new_run_dir(options: Options, recipe_name: str) -> Path:
    """--output, or runs/<config file or recipe name>; a folder already holding a run needs --force."""
    stem = options.config.stem if options.config else ""
    run_dir = options.output or Path("runs") / (stem if stem and stem != "run_config" else recipe_name)
    # a folder holding only a plan (train.py --plan) is no run yet
    holds_run = run_dir.exists() and any(p.name != "plan.json" for p in run_dir.iterdir())
    if holds_run and not options.plan_only and distributed.is_main() and not options.force:
        raise UserError(f"{run_dir} already holds a run; use --resume {run_dir} to continue it, "
                        "--output for another folder, or --force to replace it")
    return run_dir


def show_recipe(setup: Setup):
    import recipes

    click.echo(f"recipe {setup.recipe_name}:")
    for key, value in setup.recipe.items():
        click.echo(f"  {key} = {value!r}")
    for key, old, new, why in setup.changes:
        click.echo(f"{why} {key} = {new!r} (recipe: {old!r})" if why else f"Overriding: {key} = {new!r} "
                   f"(recipe: {old!r})")
    for note in recipes.notes(setup.recipe):
        click.echo(f"note: {note}")


def check_4bit_here(recipe: dict, options: Options):
    import torch

    from kit import backend as backends

    if recipe["load_in_4bit"] and not torch.cuda.is_available() and not (options.plan_only and options.gpu):
        backends.check_cpu_4bit()
        click.echo("note: 4-bit weights on the CPU run through bitsandbytes' CPU kernels: correct but slow")


def prepare_run_folder(setup: Setup, loaded: dict, options: Options) -> tuple[list, list]:
    """Bad rows split off, the replaced run set aside (--force), run_config.json and heldout.jsonl written;
    returns the training samples and the held-out questions."""
    from data.lint import split_bad_rows
    from kit.train import heldout

    run_dir, main_rank = setup.run_dir, distributed.is_main()
    if options.force and not options.resume_dir and main_rank:  # checks passed: the old run waits aside until
        runfolder.set_aside(run_dir)                               # the new one has started
    distributed.barrier()
    train_samples = split_bad_rows(loaded["train_samples"], loaded["findings"], options.on_bad_row,
                                   run_dir / "skipped.jsonl" if main_rank else None)
    eval_questions = heldout.eval_questions(setup.recipe, loaded["eval_samples"], options.on_bad_row,
                                            run_dir if main_rank else None)
    run_dir.mkdir(parents=True, exist_ok=True)
    if main_rank:  # one writer under torchrun
        overrides = [f"{key}={_as_text(new)}" for key, _, new, why in setup.changes
                     if not why and not (options.resume_dir and key == "backend")]
        write_json(run_dir / "run_config.json", indent=2, value={
            "recipe_name": setup.recipe_name, "overrides": overrides, "config": setup.config,
            "recipe": setup.recipe, "family": loaded["family"].name, "backend": setup.backend,
            "precision": setup.precision, "versions": runfolder.versions(), "code_version": runfolder.code_version(),
            "command": " ".join(sys.argv), "launch": distributed.describe(setup.recipe)})
        if loaded["heldout_rows"]:
            heldout.write_heldout(run_dir / "heldout.jsonl", loaded["heldout_rows"])
    return train_samples, eval_questions


def load_model(method, setup: Setup, loaded: dict):
    from kit import backend as backends
    from kit.inputs import chat

    model, processor = method.load(loaded["base_path"], setup.recipe, setup.backend,
                                   backends.torch_dtype(setup.precision))
    chat.set_limits(processor, setup.recipe)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    click.echo(f"model {setup.recipe['model_name_or_path']}: {trainable:,} of {total:,} parameters trained "
               f"({setup.recipe['finetune']})")
    if distributed.world() > 1:
        click.echo(distributed.describe_line(setup.recipe))
    return model, processor


def train(trainer, collator, setup: Setup, options: Options) -> tuple[int, int]:
    """Runs the trainer from the last complete checkpoint (--resume) to max_steps; (steps done, resumed at)."""
    from kit.train import checkpoints, progress

    recipe, run_dir = setup.recipe, setup.run_dir
    checkpoint = checkpoints.resume_point(run_dir / "checkpoints", setup.resumed) if options.resume_dir else None
    if options.resume_dir:
        click.echo(f"resuming from {checkpoint}" if checkpoint else "no complete checkpoint yet: starting over")
    resumed_at = checkpoints.step_of(checkpoint) if checkpoint else 0
    trainer.add_callback(checkpoints.CompleteCheckpoints(keep=recipe["save_total_limit"]))
    trainer.add_callback(progress.ProgressLine(run_dir / "metrics.jsonl", collator, keep_until=resumed_at))
    trainer.add_callback(progress.StopOnSignal())
    trainer.add_callback(progress.CommitAfterFirstStep())
    steps_done = checkpoints.finished_at(checkpoint, recipe["max_steps"])
    if steps_done:  # stopped after its last checkpoint, before the final save: that checkpoint is the result
        checkpoints.load_final_weights(trainer.model, checkpoint, recipe["finetune"])
        return steps_done, resumed_at
    with distributed.errors_from_every_rank():  # a bad row may sit in one rank's shard only
        checkpoints.train_from(trainer, checkpoint, recipe["finetune"])
    if trainer.state.global_step < trainer.state.max_steps:
        raise UserError(_stopped_early(trainer.state, run_dir))
    return trainer.state.global_step, resumed_at


def save(trainer, processor, run_dir: Path, steps_done: int, resumed_at: int, this_session: float):
    """The final weights and processor into the run folder, the loss curve, and the closing line."""
    from kit.train import progress, training_log

    if not runfolder.save_final(trainer, processor, run_dir):
        return  # another rank's process: rank 0 writes
    training_log.plot_loss(run_dir / "metrics.jsonl", run_dir / "loss.png")
    final_loss, earlier = training_log.summary(run_dir / "metrics.jsonl", resumed_at)
    click.echo(f"done: {steps_done} steps in {_duration(earlier + this_session)}"
               + (f" ({_duration(this_session)} of it since resuming at step {resumed_at})" if resumed_at else "")
               + f" | final loss {final_loss:.4f} | peak mem {progress.peak_memory_gb():.1f} GB | "
               f"outputs in {run_dir}")


def _stopped_early(state, run_dir: Path) -> str:
    """What to say when training ended before max_steps: a checkpoint is named only if it is complete."""
    from kit.train import checkpoints

    saved = checkpoints.last_complete(run_dir / "checkpoints")
    if saved and checkpoints.step_of(saved) == state.global_step:
        return (f"interrupted at step {state.global_step}: checkpoint saved in {saved}; continue with: "
                f"{distributed.relaunch()} --resume {run_dir}")
    where = f"step {state.global_step} of {state.max_steps}"
    kept = f"; the last checkpoint is {saved}" if saved else "; no checkpoint was saved"
    return (f"training stopped at {where} without being asked to{kept}: the data ran out early; check it with "
            f"python train.py --plan (or python -m data.lint)")


def _as_text(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def _duration(seconds: float) -> str:
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


main.help = help_with_examples(main.help, __doc__)  # --help shows the examples above

if __name__ == "__main__":
    main()
