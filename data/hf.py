"""Any Hugging Face data set of image + question + answer rows, kept Arrow-backed (memory-mapped) and turned
into samples one row at a time, so host memory does not grow with the number of rows.

    dataset=hf:HuggingFaceM4/ChartQA            # a hub id (what `chartqa` is)
    dataset=hf:/data/chartqa                    # a folder written by Dataset(Dict).save_to_disk
    dataset=hf:/data/chartqa-parquet            # a folder of parquet files (train-*.parquet, val-*.parquet, ...)
    dataset_columns=image=img,question=q,answer=answers,subset=source    # which column is what

`dataset_columns` names the image, question and answer (a string or a list of accepted strings) columns and
an optional subset column; `instruction=TEXT` instead of a question column asks every row the same thing
(LaTeX OCR). Images stay encoded ({"bytes", "path"} dicts) until the collator decodes a batch of them.

A data set with a `messages` column (TRL's vision format: messages with {"type": "image"} / {"type": "text"}
parts, or LLaMA-Factory's plain-text turns with <image>, and an `images` column of image lists) is read as
conversations, lazily too; `dataset_columns=messages=COLUMN,images=COLUMN` names other columns.
"""

import hashlib
import os
import re
from pathlib import Path

from data.formats import question_sample
from kit.errors import UserError

CHARTQA_COLUMNS = {"image": "image", "question": "query", "answer": "label", "subset": "human_or_machine"}
PRESETS = {  # dataset name (data.PRESETS) -> (hub id, default columns)
    "chartqa": ("HuggingFaceM4/ChartQA", CHARTQA_COLUMNS),
    "latex_ocr": ("unsloth/LaTeX_OCR", {"image": "image", "answer": "text",
                                        "instruction": "Write the LaTeX representation for this image."}),
}
SPLIT_WORDS = ("train", "val", "validation", "valid", "dev", "test", "eval")
ROLES = ("image", "question", "answer", "subset", "instruction", "messages", "images")
CHAT_ROLES = ("messages", "images")
SUBSET_NAMES = {"human_or_machine": {0: "human", 1: "augmented"}}  # ChartQA: people's vs generated questions


class DatasetNotFound(UserError, FileNotFoundError):
    """The data set cannot be read (no network and no local copy, no such folder, no such split or column)."""


def parse_columns(items, default: dict) -> dict:
    """["image=img", "question=q"] -> {"image": "img", "question": "q"} over `default`; [] keeps `default`."""
    columns = dict(default)
    for item in items or []:
        role, _, column = item.partition("=")
        if role.strip() not in ROLES or not column.strip():
            raise DatasetNotFound(f"dataset_columns: {item!r} is not ROLE=COLUMN with ROLE one of "
                                  f"{', '.join(ROLES)} (e.g. dataset_columns=image=image,question=query,answer=label)")
        columns[role.strip()] = column.strip()
    given = {item.partition("=")[0].strip() for item in items or []}
    if "instruction" in given:
        columns.pop("question", None)  # the same question for every row replaces a question column
    elif "question" in given:
        columns.pop("instruction", None)
    return columns


class RowToSample:
    """One Arrow row -> the kit's sample; a plain class so dataloader workers can unpickle it."""

    def __init__(self, prefix: str, columns: dict):
        self.prefix, self.columns = prefix, columns
        self.image_column = columns["image"]

    def image_count(self, sample: dict) -> int:
        return 1  # one image per row; its pixels are not read in a text-only view

    def __call__(self, row: dict, index: int) -> dict:
        c = self.columns
        answers = row[c["answer"]]
        answers = [str(a) for a in answers] if isinstance(answers, (list, tuple)) else [str(answers)]
        question = row[c["question"]] if "question" in c else c["instruction"]
        image = row[c["image"]]
        extras = {}
        if "subset" in c:
            value = row[c["subset"]]
            extras["subset"] = SUBSET_NAMES.get(c["subset"], {}).get(value, str(value))
        return question_sample(f"{self.prefix}-{index}", [image] if image is not None else [], question, answers,
                               **extras)


class ChatRowToSample:
    """One Arrow row of messages + images -> the kit's sample (TRL's format, or LLaMA-Factory's <image> turns)."""

    def __init__(self, prefix: str, columns: dict):
        self.prefix, self.columns = prefix, columns
        self.image_column = columns.get("images")

    def __call__(self, row: dict, index: int) -> dict:
        from data.formats import OPENAI_TAGS, broken_sample, conversation, last_answer, sample

        where = f"{self.prefix}-{index}"
        try:
            messages = conversation(row[self.columns["messages"]], where, OPENAI_TAGS)
        except ValueError as error:  # kept as a row that carries its problem, as a JSONL line would be
            return broken_sample(where, str(error).split(": ", 1)[-1])
        images = row.get(self.image_column) if self.image_column else None
        return sample(where, images or [], messages, last_answer(messages))

    def image_count(self, sample: dict) -> int:
        from data.formats import placeholder_count

        return placeholder_count(sample["messages"])


class LazySamples:
    """A sequence of samples over an Arrow table: `samples[i]` builds one sample from row `rows[i]`;
    slicing and `select` give views, never copies of the data. `fingerprint` names the content."""

    def __init__(self, dataset, to_sample: RowToSample, fingerprint: str, rows=None, images: bool = True):
        import numpy as np

        self.dataset, self.to_sample, self.images = dataset, to_sample, images
        self.rows = np.arange(len(dataset), dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
        subset = "" if rows is None else hashlib.sha1(self.rows.tobytes()).hexdigest()[:12]
        self.fingerprint = f"{fingerprint}{'-' + subset if subset else ''}"
        self._base_fingerprint = fingerprint

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.select(range(*index.indices(len(self))))
        index = int(index)
        if index < 0:
            index += len(self)
        row = int(self.rows[index])  # IndexError past the end, as a list would
        return self._sample(self.dataset[row], row)

    def _sample(self, record: dict, row: int) -> dict:
        column = self.to_sample.image_column
        if not self.images and column:
            record = {**record, column: None}
        sample = self.to_sample(record, row)
        if not self.images:
            sample["images"] = [None] * self.to_sample.image_count(sample)  # their pixels are not read here
        return sample

    def __iter__(self, chunk: int = 64):
        column = self.to_sample.image_column
        data = self.dataset if self.images or not column else self.dataset.remove_columns([column])
        for start in range(0, len(self.rows), chunk):
            rows = self.rows[start:start + chunk].tolist()
            columns = data[rows]  # one Arrow take per chunk: far faster than row by row
            for offset, row in enumerate(rows):
                yield self._sample({name: values[offset] for name, values in columns.items()}, row)

    def select(self, indices) -> "LazySamples":
        return LazySamples(self.dataset, self.to_sample, self._base_fingerprint, self.rows[list(indices)],
                           self.images)

    def without_images(self) -> "LazySamples":
        """The same rows with the image column left unread (images are [None]): for text-only passes."""
        return LazySamples(self.dataset, self.to_sample, self._base_fingerprint, self.rows, images=False)


def _offline_hint(name: str, shown: str) -> str:
    from data.hub import host

    return (f"{shown}: {name} is not in the local Hugging Face cache and {host()} cannot be reached. On a machine "
            f"with network run: python -c \"from datasets import load_dataset; "
            f"load_dataset('{name}').save_to_disk('DIR')\", copy DIR here and use --set dataset=hf:DIR "
            f"(a folder of its parquet files works too), or train on a local file with --set dataset=jsonl:PATH")


def _hub_cached(name: str) -> bool:
    import glob

    from datasets import config

    owner_and_name = name.split("/")
    from datasets.naming import camelcase_to_snakecase

    owner_and_name[-1] = camelcase_to_snakecase(owner_and_name[-1])
    root = os.path.join(os.path.expanduser(str(config.HF_DATASETS_CACHE)), "___".join(owner_and_name))
    return any(os.path.isdir(p) for p in glob.glob(os.path.join(root, "*", "*", "*")))


def _load_hub(name: str, split: str, shown: str):
    import datasets
    from datasets import config

    from data.hub import reachable

    offline = config.HF_HUB_OFFLINE or not reachable()  # a quick check: no minutes of retries offline
    if not offline:
        return datasets.load_dataset(name, split=split)
    if not _hub_cached(name):
        raise DatasetNotFound(_offline_hint(name, shown))
    import huggingface_hub.constants as hub_constants

    saved = config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE
    config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        return datasets.load_dataset(name, split=split)
    finally:
        config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved


def _refuse_empty_save(folder: Path, shown: str):
    """save_to_disk of no rows writes no data file, which load_from_disk then fails on deep inside `datasets`."""
    import json

    state = folder / "state.json"
    if state.exists() and not json.loads(state.read_text()).get("_data_files"):
        from data.jsonl import EmptyData

        raise EmptyData(f"{shown}: {folder} holds a data set of no rows; save one with rows, or point at another "
                        "folder")


def _load_folder(folder: Path, split: str, shown: str):
    import datasets

    if (folder / "dataset_dict.json").exists() or (folder / "state.json").exists():
        _refuse_empty_save(folder / split if (folder / "dataset_dict.json").exists() else folder, shown)
        loaded = datasets.load_from_disk(str(folder))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DatasetNotFound(f"{shown}: no split {split!r} in {folder} (splits: {', '.join(loaded)})")
            return loaded[split]
        if split != "train":
            raise DatasetNotFound(f"{shown}: {folder} holds one data set with no splits, so there is no "
                                  f"{split!r} split; hold rows out with eval_fraction instead")
        return loaded
    files = sorted(folder.rglob("*.parquet"))
    if not files:
        raise DatasetNotFound(f"{shown}: {folder} holds neither a save_to_disk data set (dataset_dict.json or "
                              "state.json) nor parquet files")
    # A file belongs to a split by its name (train-00000-of-00002.parquet, val.parquet) or its folder (test/);
    # a folder with no split names at all is one train split. No guessing of aliases (val is not validation).
    named = lambda f, s: re.match(rf"{re.escape(s)}([-_.]|$)", f.stem) or s in f.relative_to(folder).parts[:-1]  # noqa: E731
    chosen = [str(f) for f in files if named(f, split)]
    if not chosen and split == "train" and not any(named(f, s) for f in files for s in SPLIT_WORDS):
        chosen = [str(f) for f in files]
    if not chosen:
        raise DatasetNotFound(f"{shown}: no parquet file of split {split!r} in {folder} (name them "
                              f"{split}-*.parquet or put them in {folder}/{split}/)")
    # converted once into a memory-mapped Arrow cache, keyed by the files (path, size, mtime)
    return datasets.load_dataset("parquet", data_files={split: chosen}, split=split)


def _image_column_undecoded(dataset, column: str, shown: str, many: bool = False):
    from datasets import Image, List

    if many:  # a list of images per row (TRL's "images")
        return dataset.cast_column(column, List(Image(decode=False)))
    if column not in dataset.column_names:
        raise DatasetNotFound(f"{shown}: no column {column!r} for the image (columns: "
                              f"{', '.join(dataset.column_names)}); set dataset_columns=image=COLUMN")
    return dataset.cast_column(column, Image(decode=False))


def load(name_or_path: str, split: str, limit: int | None = None, columns: list | None = None,
         shown: str | None = None, prefix: str | None = None) -> LazySamples:
    """Lazy samples of one split of a preset (`chartqa`), a hub id, or a local folder (save_to_disk or parquet)."""
    hub_id, default_columns = PRESETS.get(name_or_path, (name_or_path, CHARTQA_COLUMNS))
    shown = shown or f"dataset={name_or_path}"
    columns_given, columns = columns, parse_columns(columns, default_columns)
    folder = Path(hub_id).expanduser()
    if folder.is_dir():
        dataset = _load_folder(folder, split, shown)
    elif hub_id.startswith((".", "/", "~")) or hub_id.count("/") != 1:
        raise DatasetNotFound(f"{shown}: {hub_id} is neither a folder nor a hub id like owner/name")
    else:
        dataset = _load_hub(hub_id, split, shown)
    given = {item.partition("=")[0].strip() for item in columns_given or []}
    if "messages" in given or (not given - set(CHAT_ROLES) and "messages" in dataset.column_names
                               and name_or_path not in PRESETS):
        return _chat_samples(dataset, name_or_path, hub_id, split, limit, columns, shown, prefix)
    dataset = _image_column_undecoded(dataset, columns["image"], shown)
    for role in ("question", "answer", "subset"):
        if role in columns and columns[role] not in dataset.column_names:
            raise DatasetNotFound(f"{shown}: no column {columns[role]!r} for the {role} (columns: "
                                  f"{', '.join(dataset.column_names)}); set dataset_columns={role}=COLUMN")
    rows = range(min(limit, len(dataset))) if limit else None
    prefix = prefix or f"{name_or_path if name_or_path in PRESETS else Path(hub_id).name}-{split}"
    key = hashlib.sha1(repr((dataset._fingerprint, sorted(columns.items()), prefix)).encode()).hexdigest()[:16]
    return LazySamples(dataset, RowToSample(prefix, columns), key, rows)


def _chat_samples(dataset, name_or_path: str, hub_id: str, split: str, limit, columns: dict, shown: str, prefix):
    """Lazy samples of a messages (+ images) data set."""
    columns = {"messages": columns.get("messages", "messages"), "images": columns.get("images", "images")}
    for role, column in columns.items():
        if column not in dataset.column_names and (role == "messages" or column != "images"):
            raise DatasetNotFound(f"{shown}: no column {column!r} for the {role} (columns: "
                                  f"{', '.join(dataset.column_names)}); set dataset_columns={role}=COLUMN")
    if columns["images"] in dataset.column_names:
        dataset = _image_column_undecoded(dataset, columns["images"], shown, many=True)
    else:
        columns.pop("images")  # a text-only conversation data set
    rows = range(min(limit, len(dataset))) if limit else None
    prefix = prefix or f"{Path(hub_id).name}-{split}"
    key = hashlib.sha1(repr((dataset._fingerprint, sorted(columns.items()), prefix, "chat")).encode()).hexdigest()[:16]
    return LazySamples(dataset, ChatRowToSample(prefix, columns), key, rows)
