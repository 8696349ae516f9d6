"""Fine-tune Qwen2-VL on charts: 4-bit QLoRA through Unsloth on a GPU, or plain transformers + peft.

    python train.py --recipe chartqa                          # Qwen2-VL-7B QLoRA, fits a 24 GB GPU
    python train.py --recipe demo                             # tiny model, synthetic charts, CPU, ~1-2 min
    python train.py --recipe demo --set max_steps=100 --output runs/quick
    python train.py --resume runs/chartqa                     # continue from the last checkpoint
    python train.py --config my.yaml --set max_steps=50       # a JSON/YAML dict of recipe keys (+ "recipe")

Writes into the run folder: run_config.json (resolved recipe, versions), the adapter (or the whole model
for finetune=full) with the processor, checkpoints/, metrics.jsonl and loss.png.
"""

import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import click

from kit import distributed, runfolder
from kit.cli import help_with_examples, user_errors
from kit.errors import UserError
from kit.paths import write_json


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


def run(options: Options):
    import recipes
    from kit import backend as backends
    from kit.noise import silence_known_noise

    silence_known_noise()

    distributed.prepare()

    # --- options -> resolved recipe ---------------------------------------------------------------
    recipe_name, overrides, config, resume_dir = options.recipe, options.overrides, options.config, options.resume_dir
    plan_only, force, gpu = options.plan_only, options.force, options.gpu
    if resume_dir:
        from kit.run_checks import read_run_config

        saved = read_run_config(resume_dir)
        recipe_name, overrides = saved["recipe_name"], list(saved["overrides"]) + list(overrides)
        config, config_label = saved.get("config"), f"{resume_dir / 'run_config.json'} (config)"
        run_dir = resume_dir
    elif recipe_name and config:
        raise UserError("give --recipe NAME or --config FILE, not both (a config names its recipe as \"recipe\")")
    elif config:
        config_label, config_stem, config = str(config), config.stem, recipes.read_config(config)
    elif not recipe_name:
        raise UserError(f"give --recipe NAME (one of: {', '.join(recipes.names())}), --config FILE "
                        "or --resume RUN_DIR")
    if options.backend:
        overrides = [*overrides, f"backend={options.backend}"]
    if config is not None:
        recipe, changes, recipe_name = recipes.load_config(config, overrides, config_label)
    else:
        recipe, changes = recipes.load(recipe_name, overrides)
    from kit import grpo

    recipe, inherited = grpo.prepare(recipe)  # method=grpo: the model keys of the run it starts from
    if gpu:
        from kit.plan import gpu_count, named_gpu

        card = gpu_count(gpu)[1]
        if card:
            named_gpu(card)  # a mistyped --gpu is refused before any data loads
    if not resume_dir:
        default_name = config_stem if config and config_stem != "run_config" else recipe_name
        run_dir = options.output or Path("runs") / default_name
        # a folder holding only a plan (train.py --plan) is no run yet
        holds_run = run_dir.exists() and any(p.name != "plan.json" for p in run_dir.iterdir())
        if holds_run and not plan_only and distributed.is_main():
            if not force:
                raise UserError(f"{run_dir} already holds a run; use --resume {run_dir} to continue it, "
                                "--output for another folder, or --force to replace it")
    click.echo(f"recipe {recipe_name}:")
    for key, value in recipe.items():
        click.echo(f"  {key} = {value!r}")
    for key, old, new in changes:
        click.echo(f"Overriding: {key} = {new!r} (recipe: {old!r})")
    for key, old, new in inherited:
        click.echo(f"init_from: {key} = {new!r} (recipe: {old!r}), as {recipe['init_from']} was trained")
    for note in recipes.notes(recipe):
        click.echo(f"note: {note}")

    backend, reason = backends.select(recipe["backend"])
    precision = backends.precision(recipe["precision"], backend)
    click.echo(f"backend {backend} ({reason}); precision {precision}")
    distributed.init(recipe)
    import torch

    if recipe["load_in_4bit"] and not torch.cuda.is_available() and not (plan_only and gpu):
        backends.check_cpu_4bit()
        click.echo("note: 4-bit weights on the CPU run through bitsandbytes' CPU kernels: correct but slow")

    # --- load: data, preflight, model, collator ---------------------------------------------------
    import data
    from kit import chat, families, model as models, packing, plan, progress, trainer as training, video

    from transformers import AutoProcessor

    with distributed.main_first():  # rank 0 fills the caches, then the others read them
        base_path = models.resolve(recipe["model_name_or_path"], weights=not plan_only)
        family, processor = families.of_model(base_path), AutoProcessor.from_pretrained(base_path)
        recipe = plan.with_model_grid(recipe, family, processor)  # aligned synthetic charts need the model's grid
        train_samples = data.load(recipe, recipe["dataset_split"], limit=options.plan_samples if plan_only else 0,
                                  progress=distributed.is_main())
        eval_split = data.load(recipe, recipe["eval_split"], progress=False) if recipe["eval_split"] else None
    train_samples, eval_samples, heldout_rows = training.hold_out(recipe, train_samples, eval_split)
    click.echo(f"data: {len(train_samples)} training samples from {recipe['dataset']}; model family {family.name}")
    chat.set_pixels(processor, recipe["min_pixels"], recipe["max_pixels"])
    video.set_sampling(processor, recipe["fps"], recipe["max_frames"])
    findings, counts = plan.preflight(train_samples, processor, recipe)
    gpus, gpu = plan.gpu_count(gpu)
    gpu_name, gpu_bytes = plan.gpu_memory(gpu)
    planned = plan.planning_precision(precision, recipe["precision"], gpu)  # the card's, not this machine's
    shape = plan.model_shape(base_path)
    memory = plan.estimate_memory(shape, recipe, max(i + t for i, t in counts or [(0, 0)]),
                                  max((i for i, _ in counts), default=0), planned)
    if plan_only:
        from kit import plan_file

        click.echo(f"memory planned in {planned}" + (f" for --gpu {gpu}" if gpu else ""))
        plan.print_plan(train_samples, counts, findings, memory, gpu_name, gpu_bytes, recipe, processor, shape,
                        planned)
        per_gpu = plan.per_gpu_memory(shape, recipe, memory, gpus, planned) if gpus > 1 else None
        if per_gpu:
            plan.print_multi_gpu(len(train_samples), recipe, per_gpu, gpus, gpu_name, gpu_bytes)
        if distributed.is_main():
            plan_file.write(run_dir / "plan.json", plan_file.record(
                train_samples, counts, findings, memory, gpu_name, gpu_bytes, recipe, processor, planned, gpus,
                per_gpu))
            click.echo(f"plan: {run_dir / 'plan.json'}")
        return
    if gpu_bytes and torch.cuda.is_available() and memory["total"] > gpu_bytes and not force:
        raise UserError(f"the plan estimates {plan.gb(memory['total'])} peak on {gpu_name} "
                        f"({plan.gb(gpu_bytes)}); run with --plan to see the parts and what to change, "
                        "or --force to try anyway")
    from data.lint import split_bad_rows

    if force and not resume_dir and distributed.is_main():  # checks passed: the old run waits aside until the
        runfolder.set_aside(run_dir)                          # new one has started
    distributed.barrier()
    train_samples = split_bad_rows(train_samples, findings, options.on_bad_row,
                                   run_dir / "skipped.jsonl" if distributed.is_main() else None)
    eval_questions = training.eval_questions(recipe, eval_samples, options.on_bad_row,
                                             run_dir if distributed.is_main() else None)
    run_dir.mkdir(parents=True, exist_ok=True)
    if distributed.is_main():  # one writer under torchrun
        write_json(run_dir / "run_config.json", indent=2, value={
            "recipe_name": recipe_name, "overrides": [f"{k}={_as_text(v)}" for k, _, v in changes
                                                      if not (resume_dir and k == "backend")],
            "config": config, "recipe": recipe, "family": family.name, "backend": backend, "precision": precision,
            "versions": runfolder.versions(), "code_version": runfolder.code_version(), "command": " ".join(sys.argv),
            "launch": distributed.describe(recipe)})
    if heldout_rows and distributed.is_main():
        training.write_heldout(run_dir / "heldout.jsonl", heldout_rows)

    dtype = backends.torch_dtype(precision)
    if recipe["method"] == "grpo":
        model, processor = grpo.load_start(recipe, backend, dtype)
    else:
        model, processor = models.load_for_training(base_path, recipe, backend, dtype)
    chat.set_pixels(processor, recipe["min_pixels"], recipe["max_pixels"])
    video.set_sampling(processor, recipe["fps"], recipe["max_frames"])
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    click.echo(f"model {recipe['model_name_or_path']}: {trainable:,} of {total:,} parameters trained "
               f"({recipe['finetune']})")
    if distributed.world() > 1:
        launch = distributed.describe(recipe)
        click.echo(f"data parallel: {launch['world_size']} processes ({launch['launcher']}, {launch['strategy']}); "
                   f"global batch {recipe['per_device_train_batch_size']} per device x "
                   f"{recipe['gradient_accumulation_steps']} accumulation x {launch['world_size']} = "
                   f"{launch['global_batch']}")
    collator = None  # method=grpo: TRL's GRPOTrainer batches its own prompts and completions
    if recipe["method"] == "sft":
        packer = packing.for_model(model, recipe, processor.tokenizer.pad_token_id)  # None unless packing=true
        collator = progress.CountingCollator(chat.VisionCollator(processor, recipe["max_length"],
                                                        recipe["train_on_responses_only"], recipe["system_prompt"],
                                                        packer=packer))

    # --- run ---------------------------------------------------------------------------------------
    from kit import callbacks, checkpoints, sft

    checkpoint = checkpoints.resume_point(run_dir / "checkpoints", saved) if resume_dir else None
    if resume_dir:
        click.echo(f"resuming from {checkpoint}" if checkpoint else "no complete checkpoint yet: starting over")
    resumed_at = checkpoints.step_of(checkpoint) if checkpoint else 0
    # The trainer for the recipe's method is built here; checkpoints and progress are the same for both.
    if recipe["method"] == "grpo":
        trainer = grpo.build_trainer(recipe, precision, backend, run_dir / "checkpoints", model, processor,
                                     train_samples, family)
    else:
        trainer = sft.build_trainer(recipe, precision, backend, run_dir / "checkpoints", model, processor, collator,
                                    train_samples, eval_questions)
    trainer.add_callback(checkpoints.CompleteCheckpoints(keep=recipe["save_total_limit"]))
    trainer.add_callback(callbacks.ProgressLine(run_dir / "metrics.jsonl", collator, keep_until=resumed_at))
    trainer.add_callback(callbacks.StopOnSignal())
    trainer.add_callback(callbacks.CommitAfterFirstStep())
    started = time.time()
    steps_done = checkpoints.finished_at(checkpoint, recipe["max_steps"])
    if steps_done:  # stopped after its last checkpoint, before the final save: that checkpoint is the result
        checkpoints.load_final_weights(trainer.model, checkpoint, recipe["finetune"])
    else:
        with distributed.errors_from_every_rank():  # a bad row may sit in one rank's shard only
            checkpoints.train_from(trainer, checkpoint, recipe["finetune"])
        if trainer.state.global_step < trainer.state.max_steps:
            raise UserError(_stopped_early(trainer.state, run_dir))
        steps_done = trainer.state.global_step

    # --- save --------------------------------------------------------------------------------------
    final = run_dir / ".final.tmp"
    shutil.rmtree(final, ignore_errors=True)
    distributed.save_model(trainer, final)
    if not distributed.is_main():
        return
    processor.save_pretrained(final)
    for item in final.iterdir():
        item.replace(run_dir / item.name)
    final.rmdir()
    progress.plot_loss(run_dir / "metrics.jsonl", run_dir / "loss.png")
    final_loss, earlier = progress.summary(run_dir / "metrics.jsonl", resumed_at)
    this_session = time.time() - started
    click.echo(f"done: {steps_done} steps in {_duration(earlier + this_session)}"
               + (f" ({_duration(this_session)} of it since resuming at step {resumed_at})" if resumed_at else "")
               + f" | final loss {final_loss:.4f} | peak mem {progress.peak_memory_gb():.1f} GB | "
               f"outputs in {run_dir}")


def _stopped_early(state, run_dir: Path) -> str:
    """What to say when training ended before max_steps: a checkpoint is named only if it is complete."""
    from kit import checkpoints

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
