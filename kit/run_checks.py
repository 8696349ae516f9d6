"""What every reader of a run folder checks before it loads anything (train.py --resume, eval.py, merge.py,
infer.py, the board): run_config.json readable, the weights there and whole, and the family the run recorded the
one its weights are. A damaged folder is one line that names the file and the fix, never a library traceback.

A safetensors file states its own length: an 8-byte header size, a JSON header, and each tensor's byte range in
the data after it. A file shorter than the end of its last range was cut (a copy or a save that stopped); the
check reads the header only.
"""

import json
import struct
import zipfile
from pathlib import Path

from kit.errors import UserError

ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
MODEL_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


class DamagedRun(UserError):
    """A run folder (or checkpoint, or merged folder) that cannot be loaded as it is; the message names the file."""


def read_run_config(run_dir: Path) -> dict:
    """run_config.json of `run_dir`, or one line saying it is missing or damaged."""
    path = Path(run_dir) / "run_config.json"
    if not path.is_file():
        raise DamagedRun(f"{run_dir} is not a run folder (no run_config.json): give the folder train.py wrote")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DamagedRun(f"{path}: damaged ({error}); restore it from a copy, or train the run again") from None
    if not isinstance(config, dict) or not isinstance(config.get("recipe"), dict):
        raise DamagedRun(f"{path}: holds no recipe; restore it from a copy, or train the run again")
    return config


def safetensors_problem(path: Path) -> str | None:
    """Why the safetensors file at `path` cannot be loaded (missing, cut short, a damaged header), or None."""
    if not path.is_file():
        return f"{path}: missing"
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            return f"{path}: truncated ({size} bytes, not even a header)"
        (length,) = struct.unpack("<Q", head)
        if 8 + length > size:
            return f"{path}: truncated ({size} bytes, its header alone is {8 + length})"
        try:
            header = json.loads(handle.read(length))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError):
            return f"{path}: damaged header (not a safetensors file)"
    if size < 8 + length + end:
        return f"{path}: truncated ({size} of {8 + length + end} bytes)"
    return None


def _shards(index: Path) -> list[Path] | str:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError):
        return f"{index}: damaged (no weight_map)"
    return [index.parent / name for name in sorted(set(weight_map.values()))]


def weights_problem(folder: Path) -> str | None:
    """Why the weights in `folder` (an adapter, or a whole model) cannot be loaded, or None."""
    folder = Path(folder)
    names = ADAPTER_WEIGHTS if (folder / "adapter_config.json").is_file() else MODEL_WEIGHTS
    found = next((folder / name for name in names if (folder / name).is_file()), None)
    if found is None:
        return f"{folder / names[0]}: missing (the weights)"
    files = _shards(found) if found.name.endswith(".index.json") else [found]
    if isinstance(files, str):
        return files
    for path in files:
        problem = safetensors_problem(path) if path.suffix == ".safetensors" else _zip_problem(path)
        if problem:
            return problem
    return None


def _zip_problem(path: Path) -> str | None:
    """torch.save's files are zip archives: a cut one has lost its directory, at the end."""
    if not path.is_file():
        return f"{path}: missing"
    try:
        with zipfile.ZipFile(path):
            return None
    except (zipfile.BadZipFile, OSError):
        return f"{path}: truncated or damaged"


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why --resume cannot continue from `checkpoint` (its weights, optimizer, scheduler or state), or None."""
    problem = weights_problem(checkpoint)
    if problem:
        return problem
    for name in ("optimizer.pt", "scheduler.pt"):
        problem = _zip_problem(checkpoint / name) if (checkpoint / name).exists() else None
        if problem:
            return problem
    state = checkpoint / "trainer_state.json"
    try:
        json.loads(state.read_text())
    except (OSError, ValueError):
        return f"{state}: missing or damaged"
    return None


def _model_type(folder: Path) -> str | None:
    try:
        return json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def family_problem(folder: Path, run_config: dict) -> str | None:
    """The run's recorded family against its weights' config.json model_type (the folder's own, or for an
    adapter the local base it was trained on), or None when they agree or no local config tells."""
    from kit import families

    folder = Path(folder)
    config_dir = folder
    if not (folder / "config.json").is_file() and (folder / "adapter_config.json").is_file():
        try:
            base = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path") or ""
        except (OSError, ValueError, AttributeError):
            return f"{folder / 'adapter_config.json'}: damaged; restore it from a copy, or train the run again"
        config_dir = Path(base)
    model_type = _model_type(config_dir)
    if model_type is None:
        return None
    recorded = families.of_run(run_config)
    try:
        actual = families.of_model_type(model_type)
    except families.UnknownFamily as error:
        return f"{config_dir / 'config.json'}: {error}"
    if actual.name != recorded.name:
        return (f"{config_dir / 'config.json'}: model_type {model_type} is {actual.name}, but run_config.json "
                f"records family {recorded.name}; set \"family\": \"{actual.name}\" in run_config.json (or "
                "restore the weights the run trained)")
    return None


def check(folder: Path, run_config: dict | None, fix: str):
    """Raise DamagedRun when the weights in `folder` cannot be loaded (`fix` says what to do) or disagree with
    the run's recorded family."""
    problem = weights_problem(folder)
    if problem:
        raise DamagedRun(f"{problem}; {fix}")
    problem = family_problem(folder, run_config) if run_config is not None else None
    if problem:
        raise DamagedRun(problem)


def run_fix(run_dir: Path) -> str:
    """What to do about a finished run whose final weights are gone or cut: its last checkpoint makes them again."""
    return (f"python train.py --resume {run_dir} saves them again from its last checkpoint (or give one: "
            f"{Path(run_dir) / 'checkpoints' / 'checkpoint-N'})")


def problem(run_dir: Path, finished: bool) -> str | None:
    """The one line that says what is wrong with a run folder (the board shows it in its table), or None. Only a
    finished run's weights are checked: a run still training has none yet."""
    try:
        config = read_run_config(run_dir)
        if finished:
            check(run_dir, config, run_fix(run_dir))
    except UserError as error:
        return str(error)
    return None
