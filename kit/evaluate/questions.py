"""The questions eval.py scores: the run's held-out rows or a dataset's split, every row checked before any model
loads, and the shuffled-image control (each question shown another row's image)."""

import json
import random
from pathlib import Path

from kit.errors import UserError


def with_question_types(recipe: dict, question_types: str, data_spec: str | None) -> dict:
    """--question-types: the synthetic test charts asking these types instead of the recipe's."""
    from data.synthetic import QUESTION_TEMPLATES

    chosen = [name.strip() for name in question_types.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in QUESTION_TEMPLATES]
    if (data_spec or recipe["dataset"]) != "synthetic" or unknown or not chosen:
        raise UserError(f"--question-types {question_types}: for synthetic data only, types among "
                        f"{', '.join(QUESTION_TEMPLATES)}")
    return {**recipe, "synthetic_question_types": chosen}


def heldout_samples(recipe, run_dir: Path, limit: int):
    """The run's held-out rows (heldout.jsonl, in the order training scored them), from its own dataset."""
    import data

    rows = [json.loads(line) for line in (run_dir / "heldout.jsonl").read_text().splitlines() if line.strip()]
    rows = rows[:limit] if limit else rows
    source = data.load(recipe, rows[0]["split"], progress=False)
    picked = source.select([r["index"] for r in rows]) if hasattr(source, "select") else \
        [source[r["index"]] for r in rows]
    for row, sample in zip(rows, picked, strict=True):
        if sample.get("id") != row["id"]:
            raise UserError(f"{run_dir}/heldout.jsonl: row {row['index']} of {recipe['dataset']} "
                            f"({row['split']}) is now {sample.get('id')!r}, not {row['id']!r}: the data changed "
                            "since training; pass --data/--split to score other rows")
    return picked


def load_samples(recipe, data_spec, split, limit, on_bad_row, run_dir: Path | None = None):
    """(usable samples, skipped rows, split shown): every row checked (image opens, answer present) before any
    model loads. Without --data/--split: the run's held-out rows, else its dataset's test split."""
    import data
    from data.lint import lint, skipped_rows, split_bad_rows

    spec = data_spec or recipe["dataset"]
    if not data.known(spec):
        raise UserError(f"--data {spec}: choose one of {data.choices()}")
    eval_recipe = {**recipe, "dataset": spec, "limit": limit}
    if spec in ("synthetic", "synthetic_text") and limit:
        eval_recipe["synthetic_num_test"] = limit  # test images are drawn from their own index range
    held = not data_spec and not split and run_dir is not None and (run_dir / "heldout.jsonl").exists()
    files = spec.startswith(("jsonl:", "llamafactory:"))
    if not held and spec == recipe["dataset"] and files:  # a file has no splits
        raise UserError(f"{spec} has no test split and the run held no rows out (eval_fraction=0), so every row "
                        "was trained on; pass --data jsonl:OTHER_FILE, or train with --set eval_fraction=0.05")
    try:
        if held:
            samples, split = heldout_samples(recipe, run_dir, limit), "held-out rows of the run"
        else:
            split = "every row of the file" if files else split or "test"
            samples = data.load(eval_recipe, split)
    except ConnectionError as error:
        raise UserError(f"--data {spec}: could not fetch it ({error}); check the network or use jsonl:PATH") from None
    findings = lint(samples, duplicates=False)  # only rows that cannot be scored
    usable = split_bad_rows(samples, findings, on_bad_row)
    if not len(usable):
        raise UserError(f"--data {spec}: no row can be scored")
    return usable, skipped_rows(samples, findings), split


def derangement(n: int, seed: int = 0) -> list[int]:
    """donor[i] != i for every i: one random cycle through all samples (Sattolo's shuffle), fixed by `seed`."""
    donors = list(range(n))
    rng = random.Random(seed)
    for i in range(n - 1, 0, -1):
        j = rng.randrange(i)
        donors[i], donors[j] = donors[j], donors[i]
    return donors


def shown_other(sample: dict, donor: dict) -> dict:
    """The question with another row's images and videos (the shuffled control)."""
    return {**sample, "images": donor["images"], "videos": donor.get("videos") or []}
