"""`train.py --force` without data loss: the run being replaced is renamed aside, not deleted, and comes back
if the new run fails before its first training step; it is deleted only once that step has been taken."""

import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import click

_aside: dict[Path, Path] = {}  # run folder -> where its previous run waits


def set_aside(run_dir: Path):
    """Move an existing run out of the way, under a hidden name beside it."""
    if not run_dir.exists():
        return
    aside = run_dir.with_name(f".{run_dir.name}.replaced-{os.getpid()}")
    shutil.rmtree(aside, ignore_errors=True)
    run_dir.rename(aside)
    _aside[run_dir] = aside
    click.echo(f"--force: the run in {run_dir} is kept as {aside} until the new run has taken its first step")


def commit():
    """The new run has started: the old one goes (nothing to do when no run was set aside)."""
    for run_dir, aside in list(_aside.items()):
        shutil.rmtree(aside, ignore_errors=True)
        del _aside[run_dir]
        click.echo(f"--force: the previous run in {run_dir} is replaced")


def restore():
    """The new run failed before starting: its folder goes and the old run is put back."""
    for run_dir, aside in list(_aside.items()):
        shutil.rmtree(run_dir, ignore_errors=True)
        aside.rename(run_dir)
        del _aside[run_dir]
        click.echo(f"the previous run is back in {run_dir}: the new one stopped before its first step", err=True)


@contextlib.contextmanager
def restore_on_failure():
    """Around a whole training command: any failure (an error, Ctrl-C, a bad exit) before commit() restores."""
    try:
        yield
    except BaseException as stop:
        if isinstance(stop, SystemExit) and not stop.code:
            commit()
        else:
            restore()
        raise
    commit()  # finished (a run that took no step at all is still a finished run)


def versions() -> dict:
    """The versions run_config.json records: Python and the libraries whose behaviour the run depends on."""
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": sys.version.split()[0]}
    for name in ("torch", "transformers", "trl", "peft", "bitsandbytes", "unsloth", "unsloth_zoo", "datasets"):
        with contextlib.suppress(PackageNotFoundError):
            found[name] = version(name)
    return found


def code_version() -> str:
    """The kit's own version as git describes its checkout ("unknown" outside one)."""
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parents[2], timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def save_final(trainer, processor, run_dir: Path) -> bool:
    """The trained weights (adapter or whole model) and the processor into the run folder, through a temporary
    folder so that a run folder never holds half a model; False on the ranks that do not write."""
    from kit.train import distributed

    final = run_dir / ".final.tmp"
    shutil.rmtree(final, ignore_errors=True)
    distributed.save_model(trainer, final)
    if not distributed.is_main():
        return False
    processor.save_pretrained(final)
    for item in final.iterdir():
        item.replace(run_dir / item.name)
    final.rmdir()
    return True
