"""A local file of rows: JSONL (one row a line) or JSON (an array of rows, or an object of rows keyed by id),
UTF-8 with or without a byte-order mark. Each row's shape is detected (data/formats.py: ours, LLaMA-Factory
sharegpt / alpaca, LLaVA, TRL chat); image and video paths are relative to the file.

    {"image": "charts/1.png", "question": "Highest value?", "answer": "42"}        # "answers": [...] also
    {"messages": [{"role": "user", "content": "<image>Highest value?"}, {"role": "assistant", "content": "42"}],
     "images": ["charts/1.png"]}                                                   # LLaMA-Factory sharegpt
"""

import json
from pathlib import Path

from data import formats
from data.formats import BadRow
from kit.errors import UserError

__all__ = ["BadRow", "EmptyData", "load", "read_rows", "to_sample"]
SUFFIXES = (".jsonl", ".json")
ROW_KEYS = ("messages", "conversations", "question", "instruction", "image", "images")  # an object that is a row


class EmptyData(UserError):
    """A file or folder that holds no rows at all."""


def to_sample(row, line: int, path: Path) -> dict:
    """One row of `path` (at `line`) as a sample, in whichever shape it is written."""
    return formats.to_sample(row, f"{path}:{line}", Path(path).parent)


def _unreadable(path: Path, line: int, problem: str) -> dict:
    return formats.broken_sample(f"{path.name}:{line}", problem, source=f"{path}:{line}")


def _jsonl_rows(path: Path):
    """(line, row or None, problem or None) per non-blank line."""
    with path.open("rb") as handle:
        for line, raw in enumerate(handle, start=1):
            if line == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # the byte-order mark Windows editors write; not part of the row
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                yield line, None, (f"not UTF-8 text (byte 0x{raw[error.start]:02x} at column {error.start + 1}); "
                                   "save the file as UTF-8")
                continue
            if not text.strip():
                continue
            try:
                yield line, json.loads(text), None
            except json.JSONDecodeError as error:
                yield line, None, f"not valid JSON ({error.msg} at column {error.colno})"


def _utf8_text(path: Path) -> str:
    """The file's text (a byte-order mark dropped), or one line naming the first byte that is not UTF-8."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise BadRow(f"{path}:{line}: not UTF-8 text (byte 0x{data[error.start]:02x}); save the file as UTF-8") \
            from None


class _TopLevel:
    """The top level of a JSON array or object of rows, read value by value so each row keeps its line."""

    def __init__(self, path: Path, text: str):
        self.path, self.text, self.decoder = path, text, json.JSONDecoder()
        self.start = self.skip(0)

    def skip(self, index: int) -> int:
        while index < len(self.text) and self.text[index] in " \t\r\n":
            index += 1
        return index

    def value_at(self, index: int):
        try:
            return self.decoder.raw_decode(self.text, index)
        except json.JSONDecodeError as error:
            raise BadRow(f"{self.path}:{error.lineno}: not valid JSON ({error.msg} at column {error.colno})") \
                from None

    def broken(self):
        self.value_at(self.start)  # the parser names where the text stops being JSON
        raise BadRow(f"{self.path}: not valid JSON")

    def rows(self) -> tuple[bool, list]:
        """(keyed: an object rather than an array, [(line, key or None, value)] for each of its values)."""
        text, start = self.text, self.start
        if text[start] not in "[{":
            self.value_at(start)  # a parse error names its place; a valid scalar is not rows
            raise BadRow(f"{self.path}:1: a .json file must hold an array of rows or an object of rows")
        closing, index, keyed = ("]" if text[start] == "[" else "}"), self.skip(start + 1), text[start] == "{"
        rows, line, counted = [], 1, 0
        while index < len(text) and text[index] != closing:
            key, index = self.key_at(index) if keyed else (None, index)
            line += text.count("\n", counted, index)  # counted as we go: one pass over the text, not one per row
            counted = index
            row, index = self.value_at(index)
            rows.append((line, key, row))
            index = self.skip(index)
            if index < len(text) and text[index] == ",":
                index = self.skip(index + 1)
            elif index < len(text) and text[index] != closing:
                self.broken()
        if index >= len(text) or self.skip(index + 1) != len(text):
            self.broken()
        return keyed, rows

    def key_at(self, index: int) -> tuple[str, int]:
        """An object's key and where its value starts."""
        key, index = self.value_at(index)
        index = self.skip(index)
        if not isinstance(key, str) or index >= len(self.text) or self.text[index] != ":":
            self.broken()
        return key, self.skip(index + 1)


def _json_rows(path: Path):
    """(line, row, None) per element of a JSON array, or per value of an object of rows; the line is where
    the row starts, so findings point into the file as a JSONL line would."""
    text = _utf8_text(path)
    top = _TopLevel(path, text)
    if top.start == len(text):
        return
    keyed, rows = top.rows()
    if keyed and any(key in ROW_KEYS for _, key, _ in rows):  # one row written as a .json file
        yield 1, json.loads(text), None
    elif keyed and len(rows) == 1 and isinstance(rows[0][2], list):  # {"data": [rows]}: the one list is the rows
        for row in rows[0][2]:
            yield rows[0][0], row, None  # lines inside a nested list are not tracked: the list's line names them
    else:
        for line, key, row in rows:
            yield line, (dict(row, id=row.get("id", key)) if keyed and isinstance(row, dict) else row), None


def _first_char(path: Path) -> str:
    with path.open("rb") as handle:
        head = handle.read(4096).removeprefix(b"\xef\xbb\xbf").lstrip()
    return head[:1].decode("latin-1")


def read_rows(path: Path):
    """(line, row or None, problem or None) for every row of a .jsonl or .json file. The content decides, not
    the name (as the `datasets` JSON reader LLaMA-Factory uses): an array is rows, and so is a .json file
    holding one object; anything else is one row a line."""
    first = _first_char(path)
    if first == "[":
        return _json_rows(path)
    if first == "{" and path.suffix.lower() == ".json":
        try:
            json.loads(path.read_bytes().decode("utf-8-sig"))
            return _json_rows(path)
        except ValueError:  # JSON lines in a .json file (or a broken object): read line by line
            pass
    return _jsonl_rows(path)


def load(path: str, limit: int | None = None, spec: dict | None = None, base: Path | None = None) -> list[dict]:
    """Samples of a .jsonl/.json file; `spec` and `base`: a LLaMA-Factory dataset's entry and its folder."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such JSONL or JSON file")
    if path.is_dir():
        found = sorted(p.name for p in path.iterdir() if p.suffix in SUFFIXES)[:3]
        hint = f", e.g. jsonl:{path / found[0]}" if found else ""
        info = (f"; it holds dataset_info.json, so try llamafactory:{path}#NAME"
                if (path / "dataset_info.json").exists() else "")
        raise BadRow(f"{path} is a folder: jsonl: needs the .jsonl or .json file itself{hint}{info}")
    samples, lines = [], 0
    for lines, (line, row, problem) in enumerate(read_rows(path), 1):  # noqa: B007  (the count is read after)
        where = f"{path}:{line}"
        if problem is None:
            try:
                samples.append(formats.to_sample(row, where, base or path.parent, spec))
            except BadRow as error:
                samples.append(_unreadable(path, line, str(error).split(": ", 1)[-1]))
        else:
            samples.append(_unreadable(path, line, problem))
        if limit and len(samples) >= limit:
            break
    if not samples:
        size = path.stat().st_size
        what = "is empty" if size == 0 else ("holds an empty JSON array or object" if path.suffix == ".json"
                                             else "holds only blank lines")
        raise EmptyData(f"{path} {what}: no rows to read; write one row per line ({{\"image\", \"question\", "
                        "\"answer\"} or {\"messages\", \"images\"}), or point at another file")
    return samples
