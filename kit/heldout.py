"""A run's held-out rows: what train.py wrote to heldout.jsonl (eval_fraction), read back from the run's dataset.

eval.py scores them by default; merge.py compares the model as trained with the merged one on them.
"""

import json
from pathlib import Path

from kit.errors import UserError


def heldout_samples(recipe, run_dir: Path, limit: int):
    """The run's held-out rows (heldout.jsonl, in the order training scored them), from its own dataset."""
    import data

    rows = [json.loads(line) for line in (run_dir / "heldout.jsonl").read_text().splitlines() if line.strip()]
    rows = rows[:limit] if limit else rows
    source = data.load(recipe, rows[0]["split"], progress=False)
    picked = source.select([r["index"] for r in rows]) if hasattr(source, "select") else \
        [source[r["index"]] for r in rows]
    for row, sample in zip(rows, picked):
        if sample.get("id") != row["id"]:
            raise UserError(f"{run_dir}/heldout.jsonl: row {row['index']} of {recipe['dataset']} "
                            f"({row['split']}) is now {sample.get('id')!r}, not {row['id']!r}: the data changed "
                            "since training; pass --data/--split to score other rows")
    return picked
