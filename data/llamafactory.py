"""A LLaMA-Factory data folder, read by its dataset_info.json as LLaMA-Factory reads it:

    dataset=llamafactory:data#mllm_demo                      # the folder and the data set's name in it
    dataset=llamafactory:data/dataset_info.json#mllm_demo    # the same, naming the file

The entry's `file_name` (a .json/.jsonl file, or a folder of them) is relative to the folder, and so are the
images and videos (LLaMA-Factory's default media_dir is the dataset folder). `formatting` (alpaca | sharegpt),
`columns` and `tags` say where each part of a row is (data/formats.py turns it into a sample).
"""

import json
from pathlib import Path

from data.formats import ALPACA_COLUMNS, SHAREGPT_COLUMNS
from kit.errors import UserError

KNOWN_COLUMNS = set(ALPACA_COLUMNS) | set(SHAREGPT_COLUMNS) | {"tools"}


class BadDatasetInfo(UserError):
    """dataset_info.json, or the entry it names, cannot be read as an SFT data set of local files."""


def parse(spec: str) -> tuple[Path, Path, str]:
    """"DIR[/dataset_info.json]#NAME" -> (folder, dataset_info.json, NAME)."""
    where, _, name = spec.partition("#")
    path = Path(where or ".").expanduser()
    info = path if path.name == "dataset_info.json" or path.suffix == ".json" else path / "dataset_info.json"
    if not info.is_file():
        raise BadDatasetInfo(f"dataset=llamafactory:{spec}: {info} not found; give LLaMA-Factory's data folder "
                             "(the one holding dataset_info.json) and a data set's name, e.g. llamafactory:data#NAME")
    return info.parent, info, name.strip()


def entry(info: Path, name: str) -> dict:
    try:
        registry = json.loads(info.read_bytes().decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        line = f":{error.lineno}" if isinstance(error, json.JSONDecodeError) else ""
        raise BadDatasetInfo(f"{info}{line}: not valid JSON ({error}); fix the file") from None
    if not isinstance(registry, dict) or not registry:
        raise BadDatasetInfo(f"{info}: holds no data sets (an object of NAME: {{\"file_name\", ...}} is expected)")
    names = ", ".join(sorted(registry)[:20])
    if not name:
        raise BadDatasetInfo(f"{info}: name the data set after '#', e.g. llamafactory:{info.parent}#"
                             f"{next(iter(registry))} (data sets: {names})")
    if name not in registry:
        raise BadDatasetInfo(f"{info}: no data set {name!r} (data sets: {names})")
    spec = registry[name]
    if not isinstance(spec, dict):
        raise BadDatasetInfo(f"{info}: {name!r} must be an object with \"file_name\"")
    remote = next((key for key in ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name")
                   if spec.get(key)), None)
    if remote:
        raise BadDatasetInfo(f"{info}: {name!r} is read from {remote}={spec[remote]!r}, not a local file; download "
                             "it (datasets' save_to_disk) and use dataset=hf:FOLDER, or point file_name at a file")
    if spec.get("ranking"):
        raise BadDatasetInfo(f"{info}: {name!r} is a preference data set (ranking: true); the kit trains "
                             "supervised answers: use an SFT data set")
    formatting = spec.get("formatting", "alpaca")
    if formatting not in ("alpaca", "sharegpt"):
        raise BadDatasetInfo(f"{info}: {name!r} has formatting {formatting!r}; LLaMA-Factory's are alpaca and "
                             "sharegpt")
    unknown = sorted(set(spec.get("columns") or {}) - KNOWN_COLUMNS)
    if unknown:
        raise BadDatasetInfo(f"{info}: {name!r} maps columns the kit does not read: {', '.join(unknown)} "
                             f"(known: {', '.join(sorted(KNOWN_COLUMNS))})")
    if not spec.get("file_name"):
        raise BadDatasetInfo(f"{info}: {name!r} has no \"file_name\"")
    return spec


def files(folder: Path, spec: dict, info: Path) -> list[Path]:
    target = folder / spec["file_name"]
    if target.is_dir():
        found = sorted(p for p in target.rglob("*") if p.suffix in (".json", ".jsonl"))
        if not found:
            raise BadDatasetInfo(f"{info}: file_name {spec['file_name']!r} is a folder with no .json/.jsonl files")
        return found
    if not target.exists():
        raise BadDatasetInfo(f"{info}: file_name {spec['file_name']!r} not found ({target})")
    if target.suffix not in (".json", ".jsonl"):
        raise BadDatasetInfo(f"{info}: {target.name} is not .json or .jsonl; for parquet or arrow files use "
                             "dataset=hf:FOLDER")
    return [target]


def load(spec_text: str, limit: int | None = None) -> list[dict]:
    from data.jsonl import EmptyData
    from data.jsonl import load as load_file

    folder, info, name = parse(spec_text)
    spec = entry(info, name)
    samples = []
    for path in files(folder, spec, info):
        try:
            samples += load_file(str(path), limit and limit - len(samples), spec=spec, base=folder)
        except EmptyData:
            continue  # one empty file of several is not an error; all of them empty is (below)
        if limit and len(samples) >= limit:
            break
    if not samples:
        raise EmptyData(f"{info}: {name!r} names {spec['file_name']!r}, which holds no rows")
    return samples
