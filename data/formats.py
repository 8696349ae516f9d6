"""The row shapes people bring from other tools, turned into the kit's sample. One row at a time, no I/O:

    ours            {"image": "c.png", "question": "...", "answer": "42"}  or  {"images": [...], "messages":
                    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "..."}]}, ...]}
    TRL / HF chat   the same "messages" with list content, "images" beside them (a part may carry its own
                    image: {"type": "image", "image": "c.png"})
    LLaMA-Factory   sharegpt: {"messages": [{"role": "user", "content": "<image>question"}, {"role": "assistant",
                    "content": "answer"}], "images": ["c.png"]} (or "conversations" with from/value, as its
                    dataset_info.json tags say); alpaca: {"instruction", "input", "output", "system", "history",
                    "images"}; "videos" and <video> alike
    LLaVA           {"image": "c.png", "conversations": [{"from": "human", "value": "<image>\\nquestion"},
                    {"from": "gpt", "value": "answer"}]}

A `<image>` (`<video>`) in a plain-text turn marks where the next image (video) goes, and becomes an image
(video) part there; how many placeholders there are against how many images is data/lint.py's to report.
A video is a file or a list of frame files. Paths are relative to `base` (the file's folder, or the
LLaMA-Factory data folder).
"""

import json
import re
from pathlib import Path

from kit.errors import UserError

PLACEHOLDER = re.compile(r"<(image|video)>")
URL = re.compile(r"^[a-z][a-z0-9+.-]*://", re.IGNORECASE)
# A row's audio, under LLaMA-Factory's column name and the singular others use: a modality the kit does not train
AUDIO_KEYS = ("audios", "audio")
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
SHAREGPT_TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                 "system_tag": "system", "observation_tag": "observation", "function_tag": "function_call"}
OPENAI_TAGS = {**SHAREGPT_TAGS, "role_tag": "role", "content_tag": "content", "user_tag": "user",
               "assistant_tag": "assistant"}
ALPACA_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output", "history": "history",
                  "system": "system", "images": "images", "videos": "videos", "audios": "audios"}
SHAREGPT_COLUMNS = {"messages": "conversations", "system": "system", "images": "images", "videos": "videos",
                    "audios": "audios"}


class BadRow(UserError, ValueError):
    """A row that cannot be used; the message names the file, the line and the fix."""


def text_parts(text: str) -> list[dict]:
    """'<image>What is this?' -> [{"type": "image"}, {"type": "text", "text": "What is this?"}]; whitespace
    around a placeholder (LLaVA's "<image>\\n") is layout, not part of the question."""
    pieces = PLACEHOLDER.split(text)
    if len(pieces) == 1:
        return [{"type": "text", "text": text}]
    parts = []
    for index, piece in enumerate(pieces):
        if index % 2:
            parts.append({"type": piece})
        elif piece.strip():
            parts.append({"type": "text", "text": piece.strip()})
    return parts or [{"type": "text", "text": ""}]


def media(value, base: Path, frames_allowed: bool = False) -> list:
    """A row's images (or videos) as absolute paths; a video may be a list of frame files."""
    if value is None:
        return []
    items = [value] if isinstance(value, (str, dict)) else list(value)
    if frames_allowed and items and all(isinstance(i, str) and Path(i).suffix.lower() in FRAME_SUFFIXES for i in items):
        items = [items]  # "videos": ["f1.png", "f2.png"]: one video given as its frames
    out = []
    for item in items:
        if frames_allowed and isinstance(item, list):
            out.append([str((base / frame).resolve()) if isinstance(frame, str) else frame for frame in item])
        elif isinstance(item, str) and URL.match(item):
            out.append(item)  # kept as written: data/lint.py names it (the kit fetches nothing)
        elif isinstance(item, str):
            out.append(str((base / item).resolve()))
        else:
            out.append(item)  # a PIL image or encoded bytes: data/lint.py judges it
    return out


def conversation(turns, where: str, tags: dict) -> list[dict]:
    """sharegpt turns ({from, value} or {role, content} as `tags` say) -> the kit's messages."""
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        raise BadRow(f"{where}: the conversation must be a list of {{\"{tags['role_tag']}\": ..., "
                     f"\"{tags['content_tag']}\": ...}} objects")
    roles = {tags["user_tag"]: "user", tags["assistant_tag"]: "assistant", tags["system_tag"]: "system"}
    messages = []
    for turn in turns:
        role, content = turn.get(tags["role_tag"]), turn.get(tags["content_tag"])
        role = roles.get(role, role)  # observation / function_call stay as they are: lint names the role
        if isinstance(content, str):
            content = text_parts(content)
        elif isinstance(content, list):
            content = [clean_part(part) for part in content]
        else:
            raise BadRow(f"{where}: a {role} turn's \"{tags['content_tag']}\" is {json.dumps(content)}; "
                         "give it as text")
        messages.append({"role": role, "content": content})
    return messages


def clean_part(part):
    """A content part without the None-valued keys that Arrow adds to unify a column's structs."""
    if not isinstance(part, dict):
        return part
    return {key: value for key, value in part.items() if value is not None}


def inline_media(messages: list[dict], base: Path) -> tuple[list, list]:
    """Images / videos carried inside parts ({"type": "image", "image": "c.png"}, as transformers' chat
    templates take them), in order, with the parts left as bare placeholders."""
    found = {"image": [], "video": []}
    for message in messages:
        for part in message["content"] if isinstance(message["content"], list) else []:
            if not isinstance(part, dict) or part.get("type") not in found:
                continue
            kind = part["type"]
            value = part.pop(kind, None) or part.pop("url", None) or part.pop("path", None)
            if value is not None:
                found[kind] += media([value], base, frames_allowed=kind == "video")
    return found["image"], found["video"]


def shape_of(row: dict) -> str:
    if "conversations" in row:
        return "sharegpt"
    if "messages" in row:
        turns = row["messages"]
        plain = isinstance(turns, list) and any(isinstance(t, dict) and isinstance(t.get("content"), str)
                                                for t in turns)
        return "openai" if plain else "chat"
    if "instruction" in row:
        return "alpaca"
    if "question" in row:
        return "qa"
    return "unknown"


def to_sample(row, where: str, base: Path, spec: dict | None = None) -> dict:
    """The kit's sample of one row in any of the shapes above. `spec` is a LLaMA-Factory dataset_info.json
    entry (formatting, columns, tags); without it the shape is read off the row's keys."""
    if not isinstance(row, dict):
        raise BadRow(f"{where}: a row must be a JSON object, not {type(row).__name__}")
    if spec is not None:
        shape = "alpaca" if spec.get("formatting", "alpaca") == "alpaca" else "sharegpt"
    else:
        shape = shape_of(row)
    columns = {**(ALPACA_COLUMNS if shape == "alpaca" else SHAREGPT_COLUMNS), **((spec or {}).get("columns") or {})}
    audio = next((key for key in (columns["audios"], *AUDIO_KEYS) if row.get(key)), None)
    if audio:  # the same finding through jsonl: and llamafactory:, never trained as text
        raise BadRow(f"{where}: the row has audio (\"{audio}\"): the kit trains text, images and videos, not "
                     "audio; drop the row (--on-bad-row skip) or its audio and <audio> marker")
    if shape == "qa":
        return qa_sample(row, where, base)
    if shape == "openai" and spec is None:
        columns["messages"] = "messages"
    images = media(row.get(columns["images"], row.get("image") if spec is None else None), base)
    videos = media(row.get(columns["videos"], row.get("video") if spec is None else None), base, frames_allowed=True)
    if shape == "alpaca":
        messages = alpaca_messages(row, where, columns)
    elif shape == "chat":
        messages = [dict(m, content=[clean_part(p) for p in m["content"]]) if isinstance(m, dict)
                    and isinstance(m.get("content"), list) else m for m in row["messages"]]
        if not all(isinstance(m, dict) for m in messages):
            raise BadRow(f"{where}: \"messages\" must be a list of {{\"role\", \"content\"}} objects")
        inline_images, inline_videos = inline_media(messages, base)
        images, videos = images + inline_images, videos + inline_videos
    elif shape in ("sharegpt", "openai"):
        key = columns["messages"]
        if key not in row:
            raise BadRow(f"{where}: no \"{key}\" column (dataset_info.json's columns.messages); the row has "
                         f"{', '.join(map(json.dumps, row))}")
        default = OPENAI_TAGS if shape == "openai" or _looks_openai(row[key]) else SHAREGPT_TAGS
        messages = conversation(row[key], where, {**default, **((spec or {}).get("tags") or {})})
    else:
        raise BadRow(f"{where}: no row shape known by its keys ({', '.join(map(json.dumps, row)) or 'none'}): give "
                     "\"question\" + \"answer\", \"messages\" (TRL / LLaMA-Factory), \"conversations\" (LLaVA / "
                     "sharegpt) or \"instruction\" + \"output\" (alpaca)")
    system = row.get(columns.get("system") or "")
    if isinstance(system, str) and system.strip() and not any(m.get("role") == "system" for m in messages):
        messages = [{"role": "system", "content": [{"type": "text", "text": system}]}, *messages]
    if "answers" in row and not _texts(row["answers"]):
        raise BadRow(f"{where}: \"answers\" must be a list of texts, not {json.dumps(row['answers'])}")
    answers = row.get("answers") or last_answer(messages)
    return sample(row.get("id", where.rsplit("/", 1)[-1]), images, messages, answers, videos, source=where)


def _texts(value) -> bool:
    """A list of accepted answers: texts or numbers (a bool is neither)."""
    return isinstance(value, list) and all(isinstance(a, (str, int, float)) and not isinstance(a, bool) for a in value)


def _looks_openai(turns) -> bool:
    return isinstance(turns, list) and bool(turns) and isinstance(turns[0], dict) and "role" in turns[0]


def alpaca_messages(row: dict, where: str, columns: dict) -> list[dict]:
    """instruction (+ "\\n" + input) as the user turn, output as the answer, history's [q, a] pairs before."""
    prompt, response = row.get(columns["prompt"]), row.get(columns["response"], "")
    query = row.get(columns.get("query") or "", "")
    for key, value in ((columns["prompt"], prompt), (columns["response"], response)):
        if not isinstance(value, str):
            raise BadRow(f"{where}: \"{key}\" is {json.dumps(value)}; give it as text")
    messages = []
    history = row.get(columns.get("history") or "") or []
    if not isinstance(history, list) or not all(isinstance(p, list) and len(p) == 2 for p in history):
        raise BadRow(f"{where}: \"history\" must be a list of [question, answer] pairs")
    for question, answer in history:
        messages += [{"role": "user", "content": text_parts(str(question))},
                     {"role": "assistant", "content": text_parts(str(answer))}]
    text = prompt + ("\n" + query if isinstance(query, str) and query else "")
    return [*messages, {"role": "user", "content": text_parts(text)},
            {"role": "assistant", "content": [{"type": "text", "text": response}]}]


def last_answer(messages: list[dict]) -> list[str]:
    """The last assistant turn's text: what eval.py scores a conversation on."""
    for message in reversed(messages):
        if message.get("role") == "assistant":
            content = message.get("content")
            parts = content if isinstance(content, list) else [{"type": "text", "text": content}]
            return ["".join(str(p.get("text") or "") for p in parts if isinstance(p, dict)
                            and p.get("type", "text") == "text")]
    return []


def qa_sample(row: dict, where: str, base: Path) -> dict:
    """Ours: {"image" or "images", "question", "answer" or "answers"}; images go before the question."""
    for key in ("question", "answer"):
        if key in row and (not isinstance(row[key], (str, int, float)) or isinstance(row[key], bool)):
            raise BadRow(f"{where}: \"{key}\" is {json.dumps(row[key])}; give it as text")
    if "answers" in row and not _texts(row["answers"]):
        raise BadRow(f"{where}: \"answers\" must be a list of texts, not {json.dumps(row['answers'])}")
    images = media(row.get("images", row.get("image")), base)
    videos = media(row.get("videos", row.get("video")), base, frames_allowed=True)
    # A row without an answer still becomes a sample: data/lint.py reports it with its line.
    answers = row.get("answers") or ([row["answer"]] if "answer" in row else [""])
    return question_sample(row.get("id", where.rsplit("/", 1)[-1]), images, row["question"], answers, videos,
                           source=where)


def sample(sample_id, images, messages: list[dict], answers, videos=None, **extras) -> dict:
    """The one sample dict every source yields (data/__init__.py describes its keys): `extras` are a source's
    own keys (source, subset, qtype, problem); "videos" only when the row has some."""
    made = {"id": str(sample_id), "images": list(images), "messages": messages, "answers": [str(a) for a in answers],
            **extras}
    if videos:
        made["videos"] = videos
    return made


def question_sample(sample_id, images, question: str, answers, videos=(), **extras) -> dict:
    """A one-turn sample: the images and videos, then the question; the first accepted answer is the reply."""
    content = [{"type": "image"} for _ in images] + [{"type": "video"} for _ in videos] + [
        {"type": "text", "text": str(question)}]
    messages = [{"role": "user", "content": content},
                {"role": "assistant", "content": [{"type": "text", "text": str(answers[0]) if answers else ""}]}]
    return sample(sample_id, images, messages, answers, list(videos), **extras)


def broken_sample(sample_id, problem: str, **extras) -> dict:
    """A row kept as a sample that carries its problem, so lint reports it and --on-bad-row decides."""
    return sample(sample_id, [], [], [], **extras, problem=problem)


def placeholder_count(messages: list[dict], kind: str = "image") -> int:
    """How many {"type": kind} parts the messages hold: where the row's images (videos) go, in order."""
    return sum(1 for m in messages if isinstance(m, dict) and isinstance(m.get("content"), list)
               for part in m["content"] if isinstance(part, dict) and part.get("type") == kind)
