"""The GPU install: requirements.txt (Unsloth, transformers, trl, ...) around the CUDA torch already installed.

    python install.py                 # Kaggle / Colab / your CUDA env: keeps its torch; a bare env gets torch 2.14.1
    python install.py --dry-run       # what pip would install, nothing changed
    python install.py --dry-run --report plan.json   # pip's JSON report of the same

Every xformers build pins the torch it was built for, and unsloth asks for any `xformers>=0.0.27.post2`. Left to
itself pip may take the newest xformers and replace a preinstalled torch with torch 2.14 for CUDA 13 (~3 GB, a
recent driver): it did with this kit's former xformers pin, and does for unsloth's own xformers requirement
installed next to torch 2.9.1. Here the installed torch and torchvision are written into a pip constraints file,
so pip can only pick the xformers and triton built for them (xformers 0.0.33.post2 and triton 3.5.1 for torch 2.9.1).
Standard library only: it runs before anything is installed.
"""

import argparse
import os
import subprocess
import sys
import tempfile
from importlib.metadata import PackageNotFoundError, version

ROOT = os.path.dirname(os.path.abspath(__file__))
SUPPORTED = ((2, 4), (2, 15))  # torch >= 2.4 (Unsloth's floor), < 2.15 (what Unsloth 2026.10.7 allows)
BARE = {"torch": "2.14.1", "torchvision": "0.29.1"}  # a machine with no torch gets the newest pair we test


def installed(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def major_minor(text: str) -> tuple[int, int]:
    major, minor = text.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def constraints() -> tuple[list[str], str]:
    """(pip constraint lines, one line saying what happens to torch). Exits 2 on a torch outside the range."""
    torch = installed("torch")
    if torch is None:
        return [f"{name}=={pinned}" for name, pinned in BARE.items()], \
            f"no torch installed: installing torch {BARE['torch']} and torchvision {BARE['torchvision']}"
    if not SUPPORTED[0] <= major_minor(torch) < SUPPORTED[1]:
        print(f"error: torch {torch} is installed; this kit needs torch 2.4 to 2.14. Install one "
              f"(pip install torch=={BARE['torch']} torchvision=={BARE['torchvision']}) or use a fresh env, "
              "then run python install.py again", file=sys.stderr)
        sys.exit(2)
    lines = [f"torch=={torch}"]
    torchvision = installed("torchvision")
    if torchvision:
        lines.append(f"torchvision=={torchvision}")
    return lines, f"keeping the installed torch {torch}" + (f" and torchvision {torchvision}" if torchvision else
                                                             " (pip picks the torchvision built for it)")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="Resolve and print, install nothing.")
    parser.add_argument("--report", metavar="FILE", help="Write pip's JSON install report here ('-' = stdout).")
    parser.add_argument("--requirements", default=os.path.join(ROOT, "requirements.txt"),
                        help="Requirements file to install (default: this kit's requirements.txt).")
    parser.add_argument("-q", "--quiet", action="store_true", help="Pass -q to pip.")
    args = parser.parse_args()

    lines, summary = constraints()
    print(summary, file=sys.stderr)
    with tempfile.NamedTemporaryFile("w", suffix="-constraints.txt", delete=False) as handle:
        handle.write("\n".join(lines) + "\n")
    command = [sys.executable, "-m", "pip", "install", "-c", handle.name, "-r", args.requirements]
    if args.dry_run:
        command.append("--dry-run")
    if args.report:
        command += ["--report", args.report]
    if args.quiet:
        command.append("-q")
    try:
        done = subprocess.run(command)
    finally:
        os.unlink(handle.name)
    sys.exit(done.returncode)


if __name__ == "__main__":
    main()
