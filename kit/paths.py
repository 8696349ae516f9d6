"""Where the kit keeps what it builds (the cache), and the one way it writes a file or a folder: beside its final
name, then renamed, so a crash or a second process never leaves half a file behind. Layer 0: imports nothing of
ours, so data/ and recipes/ may use it too."""

import json
import os
import shutil
import tempfile
from pathlib import Path


def cache_dir() -> Path:
    """The kit's cache ($QWEN2VL_KIT_CACHE, else ~/.cache/qwen2vl-kit): tiny models, charts, preflight results."""
    root = os.environ.get("QWEN2VL_KIT_CACHE") or Path.home() / ".cache" / "qwen2vl-kit"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _temporary(path: Path) -> Path:
    # hidden, beside the target (same file system, so the rename is atomic), unique per process
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_text(path: Path, text: str) -> Path:
    """Write `text` to `path` atomically (readers see the old file or the new one, never a part)."""
    path = Path(path)
    tmp = _temporary(path)
    try:
        tmp.write_text(text)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_json(path: Path, value, indent: int | None = None) -> Path:
    """`value` as JSON (anything json cannot write as its str), atomically."""
    return write_text(path, json.dumps(value, indent=indent, default=str) + ("\n" if indent is not None else ""))


def write_jsonl(path: Path, rows) -> Path:
    """One JSON object a line, atomically."""
    return write_text(path, "".join(json.dumps(row, default=str) + "\n" for row in rows))


def write_with(path: Path, save) -> Path:
    """`save(tmp_path)` writes the file (a PNG through PIL or matplotlib, ...); it is then renamed to `path`.
    The temporary name keeps the suffix, so writers that pick a format from it still do."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        save(tmp)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def build_dir(target: Path, build, replace: bool = False) -> Path:
    """A folder made by `build(tmp_folder)` and renamed to `target` once complete. An existing `target` is kept
    (another process built the same thing first: caches), or with `replace` swapped for the new one (the caller
    has checked that it may be)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        build(tmp)
        if target.exists() and replace:
            shutil.rmtree(target)
        if target.exists():
            shutil.rmtree(tmp)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
