"""A local JSONL file, one sample a line; image paths are relative to the file. Two row shapes:

    {"image": "charts/1.png", "question": "Highest value?", "answer": "42"}        # "answers": [...] also
    {"images": ["a.png"], "messages": [{"role": "user", "content": [{"type": "image"},
        {"type": "text", "text": "..."}]}, {"role": "assistant", "content": [{"type": "text", "text": "..."}]}]}
"""

import json
from pathlib import Path


class BadRow(ValueError):
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
    samples = []
    with path.open(encoding="utf-8") as handle:
        for line, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                samples.append(to_sample(json.loads(text), line, path))
            except (json.JSONDecodeError, BadRow) as error:
                # Kept as a sample that carries its problem, so lint reports it and --on-bad-row decides.
                problem = f"not valid JSON ({error.msg} at column {error.colno})" \
                    if isinstance(error, json.JSONDecodeError) else str(error).split(": ", 1)[-1]
                samples.append({"id": f"{path.name}:{line}", "images": [], "messages": [], "answers": [],
                                "source": f"{path}:{line}", "problem": problem})
            if limit and len(samples) >= limit:
                break
    return samples
