"""What train.py and bench.py do with samples before the trainer sees them: held-out rows, and datasets of row
numbers. No transformers or trl here (they come after the backend is chosen: kit/train/sft.py builds the trainer)."""

import random
from pathlib import Path

from kit.paths import write_jsonl


def indexed_dataset(samples, collator):
    """(datasets.Dataset of row numbers, a collator that looks the samples up).

    trl wants a datasets.Dataset, but turning samples into Arrow re-encodes every image (minutes and
    gigabytes for ChartQA's 28k charts); row numbers cost nothing and keep the sampler's order the same."""
    from datasets import Dataset

    def collate(rows):
        return collator([samples[row["row"]] for row in rows])

    return Dataset.from_dict({"row": list(range(len(samples)))}), collate


def indexed_datasets(samples, eval_samples, collator):
    """indexed_dataset for a training set and an evaluation set sharing one collator: eval rows are looked
    up in `eval_samples` and bypass the token counter (tokens/s is about training) and packing (held-out
    loss is computed on padded batches, as eval.py sees the model)."""
    from datasets import Dataset

    plain = getattr(collator, "collator", collator)
    unpacked = getattr(plain, "padded", plain)

    def collate(rows):
        if "eval_row" in rows[0]:
            return unpacked([eval_samples[row["eval_row"]] for row in rows])
        return collator([samples[row["row"]] for row in rows])

    eval_dataset = Dataset.from_dict({"eval_row": list(range(len(eval_samples)))}) if eval_samples else None
    return Dataset.from_dict({"row": list(range(len(samples)))}), eval_dataset, collate


def hold_out(recipe: dict, train_samples, eval_split_samples=None):
    """(training samples, held-out samples in a fixed seeded order, their rows for heldout.jsonl).

    With `eval_split` the held-out rows are that split's; with `eval_fraction` they are taken out of the
    training rows here, before anything else sees them, so no training batch can hold one."""
    if eval_split_samples is not None:
        pool, split = eval_split_samples, recipe["eval_split"]
        order = list(range(len(pool)))
    elif recipe["eval_fraction"] > 0:
        pool, split = train_samples, recipe["dataset_split"]
        count = max(1, round(len(pool) * recipe["eval_fraction"]))
        order = random.Random(recipe["seed"]).sample(range(len(pool)), count)
        kept = sorted(set(range(len(pool))) - set(order))
        train_samples = pool.select(kept) if hasattr(pool, "select") else [pool[i] for i in kept]
    else:
        return train_samples, None, []
    random.Random(recipe["seed"]).shuffle(order)  # the first eval_samples of this order are scored in training
    held = pool.select(order) if hasattr(pool, "select") else [pool[i] for i in order]
    rows = []
    described = held.without_images() if hasattr(held, "without_images") else held  # no pixels read for this
    for position, (index, sample) in enumerate(zip(order, described)):
        image = (sample.get("images") or [None])[0]
        rows.append({"split": split, "index": index, "id": sample.get("id"),
                     "question": " ".join(p.get("text", "") for m in sample.get("messages", []) if m["role"] == "user"
                                          for p in (m["content"] if isinstance(m["content"], list) else [])),
                     "answers": sample.get("answers"), "image": image if isinstance(image, str) else None,
                     "during_training": not recipe["eval_samples"] or position < recipe["eval_samples"]})
    return train_samples, held, rows


def write_heldout(path: Path, rows: list[dict]):
    write_jsonl(path, rows)


def eval_questions(recipe: dict, held, on_bad_row: str, run_dir: Path | None):
    """The held-out questions scored during training (the first eval_samples), checked like eval.py does;
    None without eval_steps."""
    if held is None or not recipe["eval_steps"]:
        return None
    from data.lint import lint, split_bad_rows

    count = min(recipe["eval_samples"] or len(held), len(held))
    questions = held.select(range(count)) if hasattr(held, "select") else held[:count]
    questions = split_bad_rows(questions, lint(questions, duplicates=False), on_bad_row,
                               run_dir / "skipped-heldout.jsonl" if run_dir else None)
    return questions if len(questions) else None
