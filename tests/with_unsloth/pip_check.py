"""Venvs and pip dry-runs for test_pip_install.py, started as soon as the session starts.

Resolving requirements.txt against PyPI takes minutes of waiting on the network (little CPU), so conftest starts
the dry-runs in the background at session start and the test reads their reports at the end: the wait overlaps
the lane's training tests instead of adding to them.

The "Kaggle" venv holds only torch 2.9.1 and torchvision 0.24.1, the real PyPI wheels, installed with --no-deps:
pip decides from installed metadata, and the ~3 GB of CUDA libraries torch depends on would add nothing but
download time (they show up in the report as what pip would add, which a Kaggle image already has). It is built
once (~1 GB download) and kept in the kit's cache.
"""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
KAGGLE_TORCH = {"torch": "2.9.1", "torchvision": "0.24.1"}


def venv(name: str, packages: list[str]) -> Path:
    """A venv in the kit's cache holding exactly `packages` (no dependencies), made once."""
    from kit.model import cache_dir

    folder = cache_dir() / "pip-check" / name
    ready = folder / ".ready"
    if not ready.exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(folder)], check=True)
        if packages:
            subprocess.run([str(folder / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", *packages],
                           check=True)
        ready.touch()
    return folder


def kaggle_venv() -> Path:
    return venv("torch-2.9.1", [f"{name}=={v}" for name, v in KAGGLE_TORCH.items()])


def bare_venv() -> Path:
    return venv("bare", [])


def start(python: Path, args: list[str], report: Path) -> subprocess.Popen:
    """`python args... --dry-run --report report` in the background; stdout/stderr kept beside the report."""
    log = open(report.with_suffix(".log"), "w")  # noqa: SIM115  (the child process writes it after we return)
    return subprocess.Popen([str(python), *args, "--dry-run", "--report", str(report)], cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT)


# The line requirements.txt had before install.py (the control's only difference from today's file).
FORMER_XFORMERS_PIN = 'xformers==0.0.35 ; sys_platform == "linux" and platform_machine == "x86_64"'


def start_all(folder: Path) -> dict:
    """The three dry-runs test_pip_install.py reads: install.py next to torch 2.9, install.py on a bare venv, and
    the control: the README's former `pip install -r requirements.txt`, with the former xformers pin, next to
    torch 2.9."""
    kaggle, bare = kaggle_venv() / "bin" / "python", bare_venv() / "bin" / "python"
    former = folder / "requirements-former.txt"
    former.write_text((ROOT / "requirements.txt").read_text().replace(
        "-r requirements-core.txt", f"-r {ROOT / 'requirements-core.txt'}") + FORMER_XFORMERS_PIN + "\n")
    return {
        "install.py, torch 2.9": (start(kaggle, ["install.py", "-q"], folder / "kaggle.json"), folder / "kaggle.json"),
        "install.py, bare": (start(bare, ["install.py", "-q"], folder / "bare.json"), folder / "bare.json"),
        "former pip -r, torch 2.9": (start(kaggle, ["-m", "pip", "install", "-q", "-r", str(former)],
                                           folder / "former.json"), folder / "former.json"),
    }
