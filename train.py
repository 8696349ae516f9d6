"""Fine-tune Qwen2-VL on charts: 4-bit QLoRA through Unsloth on a GPU, or plain transformers + peft.

    python train.py --recipe chartqa                          # Qwen2-VL-7B QLoRA, fits a 24 GB GPU
    python train.py --recipe demo                             # tiny model, synthetic charts, CPU, ~2 min
    python train.py --recipe demo --set max_steps=100 --output runs/quick
    python train.py --resume runs/chartqa                     # continue from the last checkpoint

Writes into the run folder: run_config.json (resolved recipe, versions), the adapter (or the whole model
for finetune=full) with the processor, checkpoints/, metrics.jsonl and loss.png.
"""

import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import click

from kit.errors import UserError, user_errors


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--recipe", help="Recipe name from recipes/ (chartqa, chartqa_2b, kaggle_t4, latex_ocr, demo).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe key, typed like its default; repeatable.")
@click.option("--output", type=click.Path(path_type=Path), help="Run folder. Default: runs/<recipe>.")
@click.option("--backend", type=click.Choice(["auto", "unsloth", "hf"]),
              help="Override the recipe's backend (auto picks unsloth when CUDA and unsloth are present).")
@click.option("--resume", "resume_dir", type=click.Path(path_type=Path),
              help="Continue the run in this folder from its last complete checkpoint.")
@click.option("--force", is_flag=True, help="Replace an existing run folder.")
def main(recipe, overrides, output, backend, resume_dir, force):
    """Fine-tune Qwen2-VL with a recipe; see the module docstring for examples."""
    with user_errors():
        run(recipe, overrides, output, backend, resume_dir, force)


def run(recipe_name, overrides, output, backend_name, resume_dir, force):
    import recipes
    from kit import backend as backends

    # --- options -> resolved recipe ---------------------------------------------------------------
    if resume_dir:
        saved = json.loads(_require(resume_dir / "run_config.json", "--resume needs a run folder").read_text())
        recipe_name, overrides = saved["recipe_name"], list(saved["overrides"]) + list(overrides)
        run_dir = resume_dir
    elif not recipe_name:
        raise UserError(f"give --recipe NAME (one of: {', '.join(recipes.names())}) or --resume RUN_DIR")
    if backend_name:
        overrides = [*overrides, f"backend={backend_name}"]
    recipe, changes = recipes.load(recipe_name, overrides)
    if not resume_dir:
        run_dir = output or Path("runs") / recipe_name
        if run_dir.exists() and any(run_dir.iterdir()):
            if not force:
                raise UserError(f"{run_dir} already holds a run; use --resume {run_dir} to continue it, "
                                "--output for another folder, or --force to replace it")
            shutil.rmtree(run_dir)
    click.echo(f"recipe {recipe_name}:")
    for key, value in recipe.items():
        click.echo(f"  {key} = {value!r}")
    for key, old, new in changes:
        click.echo(f"Overriding: {key} = {new!r} (recipe: {old!r})")

    backend, reason = backends.select(recipe["backend"])
    precision = backends.precision()
    click.echo(f"backend {backend} ({reason}); precision {precision}")
    import torch

    if recipe["load_in_4bit"] and not torch.cuda.is_available():
        click.echo("note: 4-bit weights on the CPU run through bitsandbytes' CPU kernels: correct but slow")

    # --- load: data, model, collator --------------------------------------------------------------
    import data
    from kit import chat, model as models

    train_samples = data.load(recipe, "train")
    click.echo(f"data: {len(train_samples)} training samples from {recipe['dataset']}")
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_json(run_dir / "run_config.json", {
        "recipe_name": recipe_name, "overrides": [f"{k}={_as_text(v)}" for k, _, v in changes
                                                  if not (resume_dir and k == "backend")],
        "recipe": recipe, "backend": backend, "precision": precision, "versions": _versions(),
        "code_version": _git_version(), "command": " ".join(sys.argv)})

    dtype = backends.torch_dtype(precision)
    base_path = models.resolve(recipe["model_name_or_path"])
    model, processor = models.load_base(base_path, backend, recipe["load_in_4bit"], dtype, for_training=True,
                                        gradient_checkpointing=recipe["gradient_checkpointing"])
    chat.set_pixels(processor, recipe["min_pixels"], recipe["max_pixels"])
    if recipe["finetune"] == "lora":
        model = models.add_lora(model, recipe, backend)
    if backend == "unsloth":
        from unsloth import FastVisionModel

        FastVisionModel.for_training(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    click.echo(f"model {recipe['model_name_or_path']}: {trainable:,} of {total:,} parameters trained "
               f"({recipe['finetune']})")
    collator = CountingCollator(chat.VisionCollator(processor, recipe["max_length"],
                                                    recipe["train_on_responses_only"], recipe["system_prompt"]))

    # --- run ---------------------------------------------------------------------------------------
    from transformers import Trainer
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    class PlainLossSFTTrainer(SFTTrainer):
        # trl's fused LM-head loss is a Triton kernel with no CPU path; the model's own loss is the same number.
        compute_loss = Trainer.compute_loss

    args = SFTConfig(
        output_dir=str(run_dir / "checkpoints"),
        per_device_train_batch_size=recipe["per_device_train_batch_size"],
        gradient_accumulation_steps=recipe["gradient_accumulation_steps"],
        learning_rate=recipe["learning_rate"], num_train_epochs=recipe["num_train_epochs"],
        max_steps=recipe["max_steps"], warmup_steps=recipe["warmup_steps"],
        lr_scheduler_type=recipe["lr_scheduler_type"], optim=recipe["optim"],
        weight_decay=recipe["weight_decay"], max_grad_norm=recipe["max_grad_norm"],
        logging_steps=recipe["logging_steps"], logging_first_step=True, save_steps=recipe["save_steps"],
        save_total_limit=recipe["save_total_limit"], seed=recipe["seed"], data_seed=recipe["seed"],
        bf16=precision == "bf16", fp16=precision == "fp16",
        # Unsloth does its own (offloaded) checkpointing, switched on in from_pretrained
        gradient_checkpointing=recipe["gradient_checkpointing"] and backend == "hf",
        gradient_checkpointing_kwargs={"use_reentrant": False},
        remove_unused_columns=False, dataset_kwargs={"skip_prepare_dataset": True},
        max_length=None,  # the collator checks lengths: a cut inside an image would break the model
        report_to="none", disable_tqdm=True, dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
    )
    trainer_class = SFTTrainer if torch.cuda.is_available() else PlainLossSFTTrainer
    if isinstance(train_samples, list):  # trl wants a datasets.Dataset; the images stay paths
        from datasets import Dataset

        train_samples = Dataset.from_list(train_samples)
    trainer = trainer_class(model=model, args=args, train_dataset=train_samples, data_collator=collator,
                            processing_class=processor)
    trainer.remove_callback(PrinterCallback)
    progress = progress_line(run_dir / "metrics.jsonl", collator, append=bool(resume_dir))
    trainer.add_callback(progress)
    checkpoint = _last_checkpoint(run_dir / "checkpoints") if resume_dir else None
    if resume_dir:
        click.echo(f"resuming from {checkpoint}" if checkpoint else "no complete checkpoint yet: starting over")
    started = time.time()
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)

    # --- save --------------------------------------------------------------------------------------
    final = run_dir / ".final.tmp"
    shutil.rmtree(final, ignore_errors=True)
    trainer.model.save_pretrained(final)
    processor.save_pretrained(final)
    for item in final.iterdir():
        item.replace(run_dir / item.name)
    final.rmdir()
    plot_loss(run_dir / "metrics.jsonl", run_dir / "loss.png")
    click.echo(f"done: {trainer.state.global_step} steps in {_duration(time.time() - started)} | "
               f"final loss {progress.last_loss:.4f} | peak mem {_peak_memory_gb():.1f} GB | "
               f"outputs in {run_dir}")


class CountingCollator:
    """Counts the real (non-padding) tokens that pass, for the tokens/s field of the progress line."""

    def __init__(self, collator):
        self.collator, self.tokens = collator, 0

    def __call__(self, samples):
        batch = self.collator(samples)
        self.tokens += int(batch["attention_mask"].sum())
        return batch


def progress_line(path: Path, counter: CountingCollator, append: bool):
    """A callback printing one fixed-field line per logging step, the same fields in metrics.jsonl."""
    # Built here, not at import: transformers may only be imported once the backend is chosen
    # (unsloth patches it on import).
    from transformers import TrainerCallback

    class ProgressLine(TrainerCallback):
        def __init__(self):
            if not append:
                path.write_text("")
            self.last_time, self.last_step, self.last_tokens, self.last_loss = time.time(), 0, 0, float("nan")

        def on_train_begin(self, args, state, control, **kwargs):
            self.last_time, self.last_step = time.time(), state.global_step

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "loss" not in logs:
                return
            now, steps = time.time(), max(state.global_step - self.last_step, 1)
            seconds = max(now - self.last_time, 1e-9)
            row = {"step": state.global_step, "loss": logs["loss"], "lr": logs.get("learning_rate", 0.0),
                   "ms_per_step": 1000 * seconds / steps,
                   "tokens_per_s": (counter.tokens - self.last_tokens) / seconds,
                   "peak_mem_gb": _peak_memory_gb(), "time": now}
            click.echo(f"step {row['step']:05d}/{state.max_steps:05d} | loss {row['loss']:.4f} | "
                       f"lr {row['lr']:.1e} | {row['ms_per_step']:,.0f} ms | {row['tokens_per_s']:,.0f} tok/s | "
                       f"mem {row['peak_mem_gb']:.1f} GB")
            with path.open("a") as handle:
                handle.write(json.dumps(row) + "\n")
            self.last_time, self.last_step, self.last_tokens = now, state.global_step, counter.tokens
            self.last_loss = row["loss"]

    return ProgressLine()


def plot_loss(metrics_path: Path, png_path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], marker=".")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)


def _peak_memory_gb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # peak RSS (Linux reports KiB)


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


if __name__ == "__main__":
    main()
