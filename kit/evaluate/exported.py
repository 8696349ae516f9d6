"""What a user chooses between when deploying a run, as eval.py --compare names it: `merged` (merge.py's 16-bit
folder) and `gguf` (every GGUF text model merge.py wrote, each scored as gguf:QUANT; `gguf:q4_k_m` names one),
found through the run's export.json. Scored on the same questions as `finetuned` (the run as trained: for QLoRA
its 4-bit base + the adapter), each pair with its fixed and broken counts.
"""

import json
from pathlib import Path

from kit.errors import UserError

DEPLOYED = ("merged", "gguf")


def is_deployed(name: str) -> bool:
    return name in DEPLOYED or name.startswith("gguf:")


def choose(compare: str, systems: tuple[str, ...], run_dir: Path | None, kind: str) -> tuple[list[str], dict]:
    """(--compare's systems eval.py loads itself, {deployed system: its merged folder or .gguf file}), in the
    order given; a name that is neither, or a deployment merge.py has not written, is one line."""
    names = list(dict.fromkeys(name.strip() for name in compare.split(",") if name.strip()))
    unknown = [name for name in names if name not in systems and not is_deployed(name)]
    if unknown or not names:
        raise UserError(f"--compare {compare}: choose from {', '.join(systems + DEPLOYED)} (gguf:QUANT for one "
                        "GGUF file, e.g. gguf:q4_k_m)")
    wanted = [name for name in names if is_deployed(name)]
    if not wanted:
        return names, {}
    if kind != "run":
        raise UserError(f"--compare {','.join(wanted)}: give the run folder (merge.py records its exports in "
                        f"RUN/export.json), not a {kind}")
    path = run_dir / "export.json"
    if not path.is_file():
        raise UserError(f"--compare {','.join(wanted)}: {path} does not exist; export the run first: python "
                        f"merge.py {run_dir} --to merged,gguf --quant f16,q4_k_m")
    export = json.loads(path.read_text())
    deployed = {}
    for name in wanted:
        deployed.update(locate(name, export, run_dir))
    return [name for name in names if not is_deployed(name)], deployed


def locate(name: str, export: dict, run_dir: Path) -> dict[str, Path]:
    """{system: path} for `merged`, `gguf` (every quant) or `gguf:QUANT`, from export.json, each checked there."""
    target = name.split(":")[0]
    folder = export.get("outputs", {}).get(target)
    if not folder:
        raise UserError(f"--compare {name}: merge.py wrote no {target} for {run_dir}; run python merge.py "
                        f"{run_dir} --to merged,gguf --force")
    if target == "merged":
        found = {"merged": Path(folder)}
    else:
        models = (export.get("gguf") or {}).get("models") or {}
        quants = [name.split(":", 1)[1]] if ":" in name else list(models)
        missing = [quant for quant in quants if quant not in models]
        if missing:
            raise UserError(f"--compare {name}: {run_dir}'s export has GGUF {', '.join(models) or 'none'}; "
                            f"write {missing[0]} with python merge.py {run_dir} --quant {','.join([*models, *missing])}"
                            " --force")
        found = {f"gguf:{quant}": Path(folder) / models[quant] for quant in quants}
    for system, path in found.items():
        if not path.exists():
            raise UserError(f"--compare {system}: {path} (from {run_dir}/export.json) is gone; export again with "
                            f"python merge.py {run_dir} --force")
    return found
