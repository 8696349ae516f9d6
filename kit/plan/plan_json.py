"""plan.json: what `train.py --plan` found, as a file (the board and any other reader take it from here, never from
the printed plan). Token statistics, lint findings, the memory estimate by part and the verdict for the card.
"""

import json
import os
from pathlib import Path

from kit.plan import estimate

FINDINGS_KEPT = 50  # the first ones, as the printed plan shows the first 10: enough to fix the data by


def record(samples, counts, findings, memory: dict, gpu_name, gpu_bytes, recipe: dict, processor, precision: str,
           gpus: int = 1, per_gpu: dict | None = None) -> dict:
    """The plan's figures; `memory` and `per_gpu` in bytes (estimate.estimate_memory / estimate.per_gpu_memory)."""
    images, texts = [i for i, _ in counts], [t for _, t in counts]
    over = [f for f in findings if "max_length" in f[2]]
    budget = max(recipe["max_length"] - estimate.stats(texts)["p95"] - 16, 64)
    return {
        "rows": len(samples),
        "tokens": {"image": estimate.stats(images), "text": estimate.stats(texts),
                   "total": estimate.stats([i + t for i, t in counts])},
        "max_length": recipe["max_length"], "over_max_length": len(over), "other_problems": len(findings) - len(over),
        "findings": [{"row": index, "place": place, "problem": problem}
                     for index, place, problem in findings[:FINDINGS_KEPT]],
        "max_pixels": recipe["max_pixels"], "image_token_budget": budget,
        "suggested_max_pixels": estimate.suggest_max_pixels(samples, processor, budget),
        "steps_per_epoch": estimate.steps_per_epoch(len(samples), recipe),
        "model": recipe["model_name_or_path"], "load_in_4bit": recipe["load_in_4bit"],
        "per_device_train_batch_size": recipe["per_device_train_batch_size"], "precision": precision,
        "memory_bytes": memory, "gpu": {"name": gpu_name, "bytes": gpu_bytes},
        "fits": None if gpu_bytes is None else memory["total"] <= gpu_bytes,
        "gpus": gpus, "per_gpu_bytes": per_gpu or {},
    }


def write(path: Path, value: dict):
    """Renamed into place whole: a reader never sees half a plan."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temporary.write_text(json.dumps(value, indent=2, default=str) + "\n")
    os.replace(temporary, path)
