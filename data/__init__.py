"""Where samples come from. Every source yields the one sample format:

    {"id": str, "images": [PIL image, path or {"bytes", "path"} dict],
     "messages": [user turn with {"type": "image"} + text, assistant turn with the answer, ... more turns],
     "answers": [every accepted answer of the last turn],
     "videos": [a video file, or a list of frame files] (only when the row has videos), ...source extras}

Local files come in the formats of the tools people used before (data/formats.py: ours, LLaMA-Factory
sharegpt / alpaca, LLaVA, TRL chat); `llamafactory:DIR#NAME` reads a LLaMA-Factory folder by its
dataset_info.json (data/llamafactory.py).

The recipe's system prompt and pixel limits apply to all sources later, in kit/inputs/chat.py. Hugging Face
sources (chartqa, latex_ocr, hf:NAME_OR_PATH) return lazy samples (data/hf.py): Arrow-backed, one sample
built per access, images decoded only by the collator.
"""

# Every name `dataset=` takes, here only: recipes check against it and load() dispatches on it.
PRESETS = ("chartqa", "latex_ocr")  # hub data sets by short name (data/hf.py knows their ids and columns)
NAMES = ("synthetic", "synthetic_text", *PRESETS)
PREFIXES = {"jsonl:": "jsonl:PATH", "hf:": "hf:HUB_ID_OR_FOLDER", "llamafactory:": "llamafactory:DIR#NAME"}


def known(name: str) -> bool:
    return name in NAMES or name.startswith(tuple(PREFIXES))


def choices() -> str:
    """The names and forms `dataset=` takes, for messages."""
    return ", ".join([*NAMES, *PREFIXES.values()])


def load(recipe: dict, split: str | None = None, progress: bool = True, limit: int = 0):
    """Samples of the recipe's dataset (a list, or lazy samples for Hugging Face sources); `split` defaults
    to the recipe's `dataset_split`; `limit` (or the recipe's) reads only that many rows."""
    split = split or recipe["dataset_split"]
    name = recipe["dataset"]
    limit = min(filter(None, (limit, recipe["limit"])), default=None)
    if name == "synthetic":
        from data.hf import DatasetNotFound
        from data.synthetic import SPLIT_OFFSETS, generate

        if split not in SPLIT_OFFSETS:  # e.g. a recipe's eval_split=dev kept after --set dataset=synthetic
            raise DatasetNotFound(f"dataset=synthetic has the splits {', '.join(SPLIT_OFFSETS)}, not {split!r}; "
                                  "set eval_split=val (or eval_split= for none)")

        num = recipe["synthetic_num_train"] if split == "train" else recipe["synthetic_num_test"]
        samples = generate(split, min(num, limit or num), seed=recipe["synthetic_seed"],
                           chart_types=recipe["synthetic_chart_types"],
                           question_types=recipe["synthetic_question_types"],
                           layout=recipe["synthetic_layout"], size=recipe["synthetic_size"],
                           grid=recipe.get("synthetic_grid", 0), progress=progress)
    elif name == "synthetic_text":
        from data.hf import DatasetNotFound
        from data.synthetic import SPLIT_OFFSETS
        from data.synthetic_text import generate

        if split not in SPLIT_OFFSETS:
            raise DatasetNotFound(f"dataset=synthetic_text has the splits {', '.join(SPLIT_OFFSETS)}, not "
                                  f"{split!r}; set eval_split=val (or eval_split= for none)")
        num = recipe["synthetic_num_train"] if split == "train" else recipe["synthetic_num_test"]
        samples = generate(split, min(num, limit or num), seed=recipe["synthetic_seed"],
                           size=recipe["synthetic_size"], grid=recipe.get("synthetic_grid", 0), progress=progress)
    elif name in PRESETS or name.startswith("hf:"):
        from data.hf import load as load_hf

        samples = load_hf(name.split(":", 1)[-1], split, limit, recipe.get("dataset_columns"),
                          shown=f"dataset={name}")
    elif name.startswith("jsonl:"):
        from data.jsonl import load as load_jsonl

        samples = load_jsonl(name.split(":", 1)[1], limit)
    elif name.startswith("llamafactory:"):
        from data.llamafactory import load as load_llamafactory

        samples = load_llamafactory(name.split(":", 1)[1], limit)
    else:
        raise ValueError(f"unknown dataset {name!r}; one of: {choices()}")
    if len(samples) == 0:  # an empty split or folder: one line here, not a StopIteration deep in training
        from data.jsonl import EmptyData

        raise EmptyData(f"dataset={name} has no rows in its {split!r} split; check the source (python -m data.lint "
                        f"{name})")
    if isinstance(samples, list):
        samples = Samples(samples, fingerprint(samples, name, split))
    return samples


class Samples(list):
    """A list of samples that names its content, so what preflight learns about it can be cached."""

    def __init__(self, samples, fingerprint: str):
        super().__init__(samples)
        self.fingerprint = fingerprint

    def select(self, indices) -> "Samples":
        """The rows at `indices`, named by this content and those rows (as lazy samples' select)."""
        import hashlib

        indices = [int(i) for i in indices]
        key = hashlib.sha1(f"{self.fingerprint}|{indices}".encode()).hexdigest()[:16]
        return Samples([self[i] for i in indices], key)


def fingerprint(samples: list, name: str, split: str) -> str:
    """The rows' text and every image file's path, size and modification time: edit a row or replace a chart
    and the fingerprint changes."""
    import hashlib
    import json
    import os

    digest = hashlib.sha1(f"{name}|{split}".encode())
    for sample in samples:
        digest.update(json.dumps([sample.get("id"), sample.get("messages"), sample.get("answers"),
                                  sample.get("problem")], sort_keys=True, default=str).encode())
        videos = [frame for video in sample.get("videos") or [] for frame in (video if isinstance(video, list)
                                                                             else [video])]
        for image in [*(sample.get("images") or []), *videos]:
            try:
                stat = os.stat(image)
                digest.update(f"{image}|{stat.st_size}|{stat.st_mtime_ns}".encode())
            except (OSError, TypeError, ValueError):
                digest.update(f"{image}|missing".encode())  # lint reports it; a new file changes this
    return digest.hexdigest()[:16]
