"""Checkpoints that a kill -9 cannot spoil and that --resume can trust, through the trainer's public hooks only.

transformers writes checkpoint-N under its final name, file after file (weights, optimizer, scheduler, RNG states,
trainer_state.json), and calls its callbacks' on_save once the last one is written. CompleteCheckpoints.on_save
then writes checkpoint-N/complete.json (renamed into place whole) and only after that removes the checkpoints beyond
save_total_limit, so that at every moment the newest complete checkpoint is on disk. --resume trusts a checkpoint
only with that marker and clears the ones without it (what a kill during a save leaves).

A full fine-tune resumes through from_pretrained (ReloadFullModel); a finished run is saved from its last checkpoint
without training (load_final_weights).

This module imports transformers at its top: import it only after kit.backend.select has chosen the backend
(Unsloth must patch transformers first).
"""

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path

import click
from transformers import TrainerCallback

from kit.train import distributed

MARKER = "complete.json"
PREFIX = "checkpoint-"


def step_of(checkpoint: Path) -> int:
    return int(checkpoint.name.removeprefix(PREFIX))


def complete(folder: Path) -> list[Path]:
    """The complete checkpoints in `folder`, oldest first."""
    found = [p for p in folder.glob(f"{PREFIX}*") if p.name.removeprefix(PREFIX).isdigit() and (p / MARKER).is_file()]
    return sorted(found, key=step_of)


def last_complete(folder: Path) -> Path | None:
    found = complete(folder)
    return found[-1] if found else None


def marker(checkpoint: Path) -> dict:
    """What the marker says: the step the checkpoint holds and the step the run was to end at."""
    return json.loads((checkpoint / MARKER).read_text())


def resume_point(folder: Path, run_config: dict) -> Path | None:
    """The newest complete checkpoint in `folder` that loads; what an unfinished save left behind is removed
    first, and a complete one that is damaged (a file cut or gone since) is named and moved aside. Weights of
    another family than `run_config` records are refused in one line."""
    from kit.run_checks import DamagedRun, family_problem

    if distributed.is_main():
        for left in discard_incomplete(folder):
            click.echo(f"note: removed {left}: its save never finished")
        for damaged in set_aside_damaged(folder):
            click.echo(f"note: skipped {damaged}")
    distributed.barrier()
    found = last_complete(folder)
    problem = family_problem(found, run_config) if found else None
    if problem:
        raise DamagedRun(problem)
    return found


def set_aside_damaged(folder: Path) -> list[str]:
    """Complete checkpoints newer than the newest one that loads, renamed to damaged-checkpoint-N (kept, never
    deleted: a save at the same step would otherwise write into them); one line each on why."""
    from kit.run_checks import checkpoint_problem

    skipped = []
    for checkpoint in reversed(complete(folder)):
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            break
        aside, tries = checkpoint.with_name(f"damaged-{checkpoint.name}"), 1
        while aside.exists():  # damaged once before, at the same step
            tries += 1
            aside = checkpoint.with_name(f"damaged-{tries}-{checkpoint.name}")
        checkpoint.rename(aside)
        skipped.append(f"{checkpoint.name} ({problem}); it is kept as {aside.name}")
    return skipped


def finished_at(checkpoint: Path | None, max_steps: int) -> int:
    """The checkpoint's step when it is already the run's last one (max_steps, or the planned end), else 0."""
    if checkpoint is None:
        return 0
    state = marker(checkpoint)
    end = max_steps if max_steps > 0 else state["max_steps"]
    return state["global_step"] if end and state["global_step"] >= end else 0


def discard_incomplete(folder: Path) -> list[Path]:
    """Remove what a save that never finished left (checkpoint folders without a marker); returns them."""
    kept = set(complete(folder))
    left = [p for p in folder.glob(f"{PREFIX}*") if p.is_dir() and p not in kept]
    for path in left:
        shutil.rmtree(path)
    return left


def mark_complete(checkpoint: Path, global_step: int, max_steps: int):
    """The marker, written beside the checkpoint's files and renamed into place: present means whole."""
    temporary = checkpoint / f".{MARKER}.tmp"
    temporary.write_text(json.dumps({"global_step": global_step, "max_steps": max_steps}) + "\n")
    os.replace(temporary, checkpoint / MARKER)


def rotate(folder: Path, keep: int, best: str | None):
    """Remove the oldest complete checkpoints beyond `keep` (0 keeps all); the newest and the best always stay."""
    found = complete(folder)
    if keep <= 0 or len(found) <= keep:
        return
    protected = {found[-1].name} | ({Path(best).name} if best else set())
    removable = [p for p in found if p.name not in protected]
    excess = len(found) - max(keep, len(found) - len(removable))
    for checkpoint in removable[:max(excess, 0)]:
        shutil.rmtree(checkpoint)


class CompleteCheckpoints(TrainerCallback):
    """Marks each checkpoint complete once transformers has written it, then rotates among complete ones.

    The trainer's own rotation must be off (save_total_limit=None in its arguments): it runs before on_save and
    could delete the last complete checkpoint while the newest one has no marker yet."""

    def __init__(self, keep: int):
        self.keep = keep

    def on_save(self, args, state, control, **kwargs):
        distributed.barrier()  # every rank has written its part (RNG state, optimizer shards)
        if distributed.is_main():
            folder = Path(args.output_dir)
            mark_complete(folder / f"{PREFIX}{state.global_step}", state.global_step, state.max_steps)
            rotate(folder, self.keep, state.best_model_checkpoint)
            # trl (1.15) writes a model card beside the checkpoints at every save, naming a model "checkpoints"
            (folder / "README.md").unlink(missing_ok=True)


def reload_full_model(model, checkpoint: Path):
    """A full fine-tune's weights from `checkpoint` through from_pretrained, which maps the saved key names onto
    the model's (transformers 5.17 saves Qwen2-VL with its original names, e.g. model.layers.*, and names its
    modules model.language_model.*); copied into the model's own tensors, so the optimizer keeps them."""
    reloaded = type(model).from_pretrained(checkpoint, dtype=next(model.parameters()).dtype)
    model.load_state_dict(reloaded.state_dict())


class ReloadFullModel(TrainerCallback):
    """On a full fine-tune's resume: the weights through from_pretrained when training begins, after the trainer
    has restored optimizer, scheduler, RNG and state from the same checkpoint."""

    def __init__(self, checkpoint: Path):
        self.checkpoint = checkpoint

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        reload_full_model(model, self.checkpoint)


class _RawReloadWarnings(logging.Filter):
    """The two warnings transformers' own resume gives when a full checkpoint's saved names miss the model's (read
    in transformers 5.17 Trainer._issue_warnings_after_load); ReloadFullModel loads those weights right after."""

    def filter(self, record):
        return not record.getMessage().startswith(("There were missing keys in the checkpoint model loaded",
                                                   "There were unexpected keys in the checkpoint model loaded"))


@contextlib.contextmanager
def full_model_resume():
    """Around trainer.train(resume_from_checkpoint=...) of a full fine-tune: the warnings above are not shown (the
    test of a killed and resumed full fine-tune fails if the weights were not reloaded)."""
    trainer_logger, quiet = logging.getLogger("transformers.trainer"), _RawReloadWarnings()
    trainer_logger.addFilter(quiet)
    try:
        yield
    finally:
        trainer_logger.removeFilter(quiet)


def train_from(trainer, checkpoint: Path | None, finetune: str):
    """trainer.train, resumed from `checkpoint` when one is given; a full fine-tune's weights through
    ReloadFullModel."""
    if checkpoint is None:
        trainer.train()
        return
    if finetune != "full":
        trainer.train(resume_from_checkpoint=str(checkpoint))
        return
    trainer.add_callback(ReloadFullModel(checkpoint))
    with full_model_resume():
        trainer.train(resume_from_checkpoint=str(checkpoint))


def load_final_weights(model, checkpoint: Path, finetune: str):
    """A run whose last checkpoint is already its end: the model takes that checkpoint's weights (no training)."""
    if finetune == "full":
        reload_full_model(model, checkpoint)
    else:
        model.load_adapter(str(checkpoint), model.active_adapter, is_trainable=True)
