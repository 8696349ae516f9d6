"""Fine-tune Qwen2-VL on charts: 4-bit QLoRA through Unsloth on a GPU, or plain transformers + peft.

    python train.py --recipe chartqa                          # Qwen2-VL-7B QLoRA, fits a 24 GB GPU
    python train.py --recipe demo                             # tiny model, synthetic charts, CPU, ~1-2 min
    python train.py --recipe demo --set max_steps=100 --output runs/quick
    python train.py --resume runs/chartqa                     # continue from the last checkpoint
    python train.py --config my.yaml --set max_steps=50       # a JSON/YAML dict of recipe keys (+ "recipe")

Writes into the run folder: run_config.json (resolved recipe, versions), the adapter (or the whole model
for finetune=full) with the processor, checkpoints/, metrics.jsonl and loss.png.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import click

from kit import distributed, runfolder
from kit.cli import help_with_examples
from kit.errors import UserError, user_errors


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--recipe", help="Recipe name from recipes/ (chartqa, chartqa_2b, kaggle_t4, latex_ocr, demo).")
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
def main(recipe, config, overrides, output, backend, resume_dir, force, plan_only, plan_samples, gpu, on_bad_row):
    """Fine-tune Qwen2-VL with a recipe or a config file."""
    with runfolder.restore_on_failure(), user_errors():
        run(recipe, overrides, output, backend, resume_dir, force, plan_only, plan_samples, gpu, on_bad_row, config)


def run(recipe_name, overrides, output, backend_name, resume_dir, force, plan_only, plan_samples, gpu, on_bad_row,
        config=None):
    import recipes
    from kit import backend as backends
    from kit.noise import silence_known_noise

    silence_known_noise()

    distributed.prepare()

    # --- options -> resolved recipe ---------------------------------------------------------------
    if resume_dir:
        saved = json.loads(_require(resume_dir / "run_config.json", "--resume needs a run folder").read_text())
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
    if backend_name:
        overrides = [*overrides, f"backend={backend_name}"]
    if config is not None:
        recipe, changes, recipe_name = recipes.load_config(config, overrides, config_label)
    else:
        recipe, changes = recipes.load(recipe_name, overrides)
    from kit import grpo

    recipe, inherited = grpo.prepare(recipe)  # method=grpo: the model keys of the run it starts from
    if gpu:
        from kit.plan import gpu_count, named_gpu

        card = gpu_count(gpu)[1]
        card and named_gpu(card)  # a mistyped --gpu is refused before any data loads
    if not resume_dir:
        run_dir = output or Path("runs") / (config_stem if config and config_stem != "run_config" else recipe_name)
        if run_dir.exists() and any(run_dir.iterdir()) and not plan_only and distributed.is_main():
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
    from kit import chat, model as models, plan, progress, trainer as training

    with distributed.main_first():  # rank 0 fills the caches, then the others read them
        train_samples = data.load(recipe, recipe["dataset_split"], limit=plan_samples if plan_only else 0,
                                  progress=distributed.is_main())
        eval_split = data.load(recipe, recipe["eval_split"], progress=False) if recipe["eval_split"] else None
        base_path = models.resolve(recipe["model_name_or_path"], weights=not plan_only)
    train_samples, eval_samples, heldout_rows = training.hold_out(recipe, train_samples, eval_split)
    click.echo(f"data: {len(train_samples)} training samples from {recipe['dataset']}")
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(base_path)
    chat.set_pixels(processor, recipe["min_pixels"], recipe["max_pixels"])
    findings, counts = plan.preflight(train_samples, processor, recipe)
    gpus, gpu = plan.gpu_count(gpu)
    gpu_name, gpu_bytes = plan.gpu_memory(gpu)
    planned = plan.planning_precision(precision, recipe["precision"], gpu)  # the card's, not this machine's
    memory = plan.estimate_memory(plan.model_shape(base_path), recipe, max(i + t for i, t in counts or [(0, 0)]),
                                  max((i for i, _ in counts), default=0), planned)
    if plan_only:
        click.echo(f"memory planned in {planned}" + (f" for --gpu {gpu}" if gpu else ""))
        plan.print_plan(train_samples, counts, findings, memory, gpu_name, gpu_bytes, recipe, processor)
        if gpus > 1:
            plan.print_multi_gpu(len(train_samples), recipe, plan.per_gpu_memory(
                plan.model_shape(base_path), recipe, memory, gpus, planned),
                gpus, gpu_name, gpu_bytes)
        return
    if gpu_bytes and torch.cuda.is_available() and memory["total"] > gpu_bytes and not force:
        raise UserError(f"the plan estimates {plan.gb(memory['total'])} peak on {gpu_name} "
                        f"({plan.gb(gpu_bytes)}); run with --plan to see the parts and what to change, "
                        "or --force to try anyway")
    from data.lint import split_bad_rows

    if force and not resume_dir and distributed.is_main():  # checks passed: the old run waits aside until the
        runfolder.set_aside(run_dir)                          # new one has started
    distributed.barrier()
    train_samples = split_bad_rows(train_samples, findings, on_bad_row,
                                   run_dir / "skipped.jsonl" if distributed.is_main() else None)
    eval_questions = training.eval_questions(recipe, eval_samples, on_bad_row,
                                             run_dir if distributed.is_main() else None)
    run_dir.mkdir(parents=True, exist_ok=True)
    distributed.is_main() and _write_json(run_dir / "run_config.json", {  # one writer under torchrun
        "recipe_name": recipe_name, "overrides": [f"{k}={_as_text(v)}" for k, _, v in changes
                                                  if not (resume_dir and k == "backend")],
        "config": config, "recipe": recipe, "backend": backend, "precision": precision, "versions": _versions(),
        "code_version": _git_version(), "command": " ".join(sys.argv), "launch": distributed.describe(recipe)})
    if heldout_rows and distributed.is_main():
        training.write_heldout(run_dir / "heldout.jsonl", heldout_rows)

    dtype = backends.torch_dtype(precision)
    if recipe["method"] == "grpo":
        model, processor = grpo.load_start(recipe, backend, dtype)
    else:
        model, processor = models.load_for_training(base_path, recipe, backend, dtype)
    chat.set_pixels(processor, recipe["min_pixels"], recipe["max_pixels"])
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
    collator = None if recipe["method"] == "grpo" else progress.CountingCollator(chat.VisionCollator(
        processor, recipe["max_length"], recipe["train_on_responses_only"], recipe["system_prompt"]))

    # --- run ---------------------------------------------------------------------------------------
    from transformers.trainer_callback import PrinterCallback
    from transformers.trainer_utils import rotate_checkpoints

    class KitTrainer(grpo.trainer_class() if recipe["method"] == "grpo" else training.sft_trainer_class()):
        def _save_checkpoint(self, model, trial):
            # Write the checkpoint beside its final name, then rename: a crash never leaves half a checkpoint.
            final_root = self.args.output_dir
            staging = Path(final_root) / f".staging-{self.state.global_step}"
            self.args.output_dir = str(staging)
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self.args.output_dir = final_root
            distributed.barrier()  # every rank has written its part (RNG state, optimizer shards) into staging
            if not distributed.is_main():
                return
            for checkpoint in staging.glob("checkpoint-*"):
                shutil.rmtree(Path(final_root) / checkpoint.name, ignore_errors=True)
                checkpoint.rename(Path(final_root) / checkpoint.name)
                best = self.state.best_model_checkpoint  # named in staging when this one is the best so far
                if best and ".staging-" in best:
                    self.state.best_model_checkpoint = str(Path(final_root) / Path(best).name)
                    self.state.save_to_json(str(Path(final_root) / checkpoint.name / "trainer_state.json"))
            shutil.rmtree(staging)  # what is left is the model card trl writes beside checkpoints
            rotate_checkpoints(output_dir=final_root, save_total_limit=self.args.save_total_limit, use_mtime=False)

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            model = model or self.model
            if recipe["finetune"] == "lora":
                return super()._load_from_checkpoint(resume_from_checkpoint, model)
            # transformers 5.17 reads a full checkpoint with its saved key names, which miss every weight of
            # Qwen2-VL's renamed modules (the run would silently restart from the base); from_pretrained maps them.
            reloaded = type(model).from_pretrained(resume_from_checkpoint, dtype=next(model.parameters()).dtype)
            model.load_state_dict(reloaded.state_dict())

    if recipe["method"] == "grpo":  # Qwen2-VL does not think: no think block to read the answer after
        trainer = KitTrainer(**grpo.trainer_arguments(recipe, precision, backend, str(run_dir / "checkpoints"),
                                                      model, processor, train_samples, think_end=None))
    else:
        args = training.sft_config(recipe, precision, backend, str(run_dir / "checkpoints"))
        train_dataset, eval_dataset, collate = training.indexed_datasets(train_samples, eval_questions, collator)
        trainer = KitTrainer(model=model, args=args, train_dataset=train_dataset, data_collator=collate,
                             processing_class=processor, eval_dataset=eval_dataset)
        trainer.eval_questions, trainer.eval_system_prompt, trainer.eval_backend = \
            eval_questions, recipe["system_prompt"], backend
    trainer.remove_callback(PrinterCallback)
    checkpoint = _last_checkpoint(run_dir / "checkpoints") if resume_dir else None
    if resume_dir:
        click.echo(f"resuming from {checkpoint}" if checkpoint else "no complete checkpoint yet: starting over")
    progress_callback = progress.progress_line(run_dir / "metrics.jsonl", collator,
                             keep_until=int(checkpoint.name.split("-")[1]) if checkpoint else 0)
    trainer.add_callback(progress_callback)
    trainer.add_callback(progress.stop_on_signal())
    trainer.add_callback(runfolder.commit_after_first_step())
    started = time.time()
    finished = _finished_at(checkpoint, recipe["max_steps"])
    if finished:  # stopped after its last checkpoint, before the final save: transformers would train a step more
        trainer._load_from_checkpoint(str(checkpoint))
        trainer.state.global_step = trainer.state.max_steps = finished
    else:
        with distributed.errors_from_every_rank():  # a bad row may sit in one rank's shard only
            trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    if trainer.state.global_step < trainer.state.max_steps:
        raise UserError(_stopped_early(trainer.state, run_dir))

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
    resumed_at = int(checkpoint.name.split("-")[1]) if checkpoint else 0
    final_loss, earlier = progress.summary(run_dir / "metrics.jsonl", resumed_at)
    this_session = time.time() - started
    click.echo(f"done: {trainer.state.global_step} steps in {_duration(earlier + this_session)}"
               + (f" ({_duration(this_session)} of it since resuming at step {resumed_at})" if resumed_at else "")
               + f" | final loss {final_loss:.4f} | peak mem {progress.peak_memory_gb():.1f} GB | "
               f"outputs in {run_dir}")


def _stopped_early(state, run_dir: Path) -> str:
    """What to say when training ended before max_steps: a checkpoint is named only if it exists."""
    saved = _last_checkpoint(run_dir / "checkpoints")
    if saved and int(saved.name.split("-")[1]) == state.global_step:
        return (f"interrupted at step {state.global_step}: checkpoint saved in {saved}; continue with: "
                f"{distributed.relaunch()} --resume {run_dir}")
    where = f"step {state.global_step} of {state.max_steps}"
    kept = f"; the last checkpoint is {saved}" if saved else "; no checkpoint was saved"
    return (f"training stopped at {where} without being asked to{kept}: the data ran out early; check it with "
            f"python train.py --plan (or python -m data.lint)")


def _finished_at(checkpoint, max_steps: int) -> int:
    """The checkpoint's step when it is already the run's last one (max_steps, or the planned end), else 0."""
    if not checkpoint:
        return 0
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    end = max_steps if max_steps > 0 else state.get("max_steps", 0)
    return state["global_step"] if end and state["global_step"] >= end else 0


def _last_checkpoint(folder: Path):
    done = [p for p in folder.glob("checkpoint-*") if (p / "trainer_state.json").exists()]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def _require(path: Path, why: str) -> Path:
    if not path.exists():
        raise UserError(f"{path} not found: {why}")
    return path


def _write_json(path: Path, value: dict):
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=2, default=str))
    tmp.replace(path)


def _as_text(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": sys.version.split()[0]}
    for name in ("torch", "transformers", "trl", "peft", "bitsandbytes", "unsloth", "unsloth_zoo", "datasets"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def _git_version() -> str:
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__)), timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _duration(seconds: float) -> str:
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


main.help = help_with_examples(main.help, __doc__)  # --help shows the examples above

if __name__ == "__main__":
    main()
