"""A local JSONL file, one sample a line; image paths are relative to the file. Two row shapes:

    {"image": "charts/1.png", "question": "Highest value?", "answer": "42"}        # "answers": [...] also
    {"images": ["a.png"], "messages": [{"role": "user", "content": [{"type": "image"},
        {"type": "text", "text": "..."}]}, {"role": "assistant", "content": [{"type": "text", "text": "..."}]}]}
"""

import json
from pathlib import Path

from kit.errors import UserError


class BadRow(UserError, ValueError):
    """A row that cannot be used; the message names the file, the line and the fix."""


def to_sample(row: dict, line: int, path: Path) -> dict:
    where = f"{path}:{line}"
    if not isinstance(row, dict):
        raise BadRow(f"{where}: a row must be a JSON object")
    images = row.get("images", [row["image"]] if "image" in row else [])
    if isinstance(images, str):
        images = [images]
    images = [str((path.parent / image).resolve()) for image in images]
    if "messages" in row:
        messages = row["messages"]
        answers = row.get("answers") or [
            part.get("text", "") for m in messages if m.get("role") == "assistant"
            for part in (m["content"] if isinstance(m["content"], list) else [{"text": m["content"]}])
        ][-1:]
    elif "question" in row:
        for key in ("question", "answer"):
            if key in row and (not isinstance(row[key], (str, int, float)) or isinstance(row[key], bool)):
                raise BadRow(f"{where}: \"{key}\" is {json.dumps(row[key])}; give it as text")
        if "answers" in row and not (isinstance(row["answers"], list) and all(
                isinstance(a, (str, int, float)) and not isinstance(a, bool) for a in row["answers"])):
            raise BadRow(f"{where}: \"answers\" must be a list of texts, not {json.dumps(row['answers'])}")
        # A row without an answer still becomes a sample: data/lint.py reports it with its line.
        answers = row.get("answers") or ([row["answer"]] if "answer" in row else [""])
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": row["question"]}]
        messages = [{"role": "user", "content": content},
                    {"role": "assistant", "content": [{"type": "text", "text": str(answers[0])}]}]
    else:
        raise BadRow(f"{where}: a row needs \"question\" + \"answer\", or \"messages\"")
    return {"id": row.get("id", f"{path.name}:{line}"), "images": images, "messages": messages,
            "answers": [str(a) for a in answers], "source": where}


def load(path: str, limit: int | None = None) -> list[dict]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such JSONL file")
    if path.is_dir():
        found = sorted(p.name for p in path.glob("*.jsonl"))[:3]
        hint = f", e.g. jsonl:{path / found[0]}" if found else ""
        raise BadRow(f"{path} is a folder: jsonl: needs the .jsonl file itself{hint}")
    samples = []
    with path.open("rb") as handle:
        for line, raw in enumerate(handle, start=1):
            try:
                text = raw.decode("utf-8")
                if not text.strip():
                    continue
                samples.append(to_sample(json.loads(text), line, path))
            except (UnicodeDecodeError, json.JSONDecodeError, BadRow) as error:
                # Kept as a sample that carries its problem, so lint reports it and --on-bad-row decides.
                if isinstance(error, UnicodeDecodeError):
                    problem = (f"not UTF-8 text (byte 0x{raw[error.start]:02x} at column {error.start + 1}); "
                               "save the file as UTF-8")
                elif isinstance(error, json.JSONDecodeError):
                    problem = f"not valid JSON ({error.msg} at column {error.colno})"
                else:
                    problem = str(error).split(": ", 1)[-1]
                samples.append({"id": f"{path.name}:{line}", "images": [], "messages": [], "answers": [],
                                "source": f"{path}:{line}", "problem": problem})
            if limit and len(samples) >= limit:
                break
    return samples
