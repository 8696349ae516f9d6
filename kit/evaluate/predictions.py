"""Scored rows (what kit/evaluate/report.py reports) from a model's answers (eval.py) or from prediction files any tool
wrote (eval.py --score): each answer judged under the task's metric (kit/evaluate/task_metrics.verdicts) after any
think block is taken off.

A prediction file's row is {"prediction", "answer" | "answers" | "messages" (its last assistant turn is the
reference), optional "system" (default: the file's name), "id", "question", "image" / "images" (relative to the
file), "subset", "qtype"}, or a row of eval.py's own predictions.jsonl (re-judged). Systems are paired on "id",
else on image + question, else on the row's position among its system's rows.
"""

import json
from pathlib import Path

from kit.cli import jsonl_rows
from kit.errors import UserError
from kit.evaluate import task_metrics
from kit.evaluate.report import GROUPS, think_markers
from kit.evaluate.scoring import split_think


def verdict(given: str, references: list[str], metric: str, relaxed_rule: str, thought=None) -> dict:
    """One system's answer to one question: the answer after any think block (kept as "think") and its verdicts."""
    found, answer = split_think("" if given is None else str(given), think_markers())
    thought = found if thought is None else thought
    return {"answer": answer, **task_metrics.verdicts(answer, references, metric, relaxed_rule),
            **({"think": thought} if thought is not None else {})}


# --- from a model's answers (eval.py) ------------------------------------------------------------------------
def text_of(message: dict) -> str:
    content = message.get("content")
    parts = content if isinstance(content, list) else [{"type": "text", "text": content}]
    return " ".join(str(p.get("text") or "") for p in parts if isinstance(p, dict) and p.get("type") == "text")


def model_rows(samples, donors, answers: dict, metric: str, relaxed_rule: str = "chartqa") -> list[dict]:
    """One row a question: every system's answer (`answers`: {system: [answer per sample]}) and its verdicts."""
    rows = []
    for i, sample in enumerate(samples):
        user = [m for m in sample["messages"] if m["role"] == "user"][-1]
        row = {"id": sample["id"], "image": path_or_none(sample["images"]), "question": text_of(user),
               "references": sample["answers"], **{k: sample[k] for k in GROUPS if k in sample}}
        if donors is not None:
            row["shuffled_image"] = path_or_none(samples[donors[i]]["images"])
        row["systems"] = {name: verdict(given[i], sample["answers"], metric, relaxed_rule)
                          for name, given in answers.items()}
        rows.append(row)
    return rows


def path_or_none(images: list):
    return str(images[0]) if images and isinstance(images[0], (str, Path)) else None


# --- from files (eval.py --score) ----------------------------------------------------------------------------
def references_of(row: dict) -> list[str] | None:
    """The row's reference answers: "answers", "answer", or the last assistant turn of "messages"."""
    if isinstance(row.get("answers"), list) and row["answers"]:
        return [str(a) for a in row["answers"]]
    if row.get("answer") is not None and not isinstance(row["answer"], (list, dict)):
        return [str(row["answer"])]
    for message in reversed(row.get("messages") or []):
        if isinstance(message, dict) and message.get("role") == "assistant":
            text = text_of(message)
            return [text] if text else None
    return None


def question_of(row: dict) -> str | None:
    if row.get("question") is not None:
        return str(row["question"])
    for message in reversed(row.get("messages") or []):
        if isinstance(message, dict) and message.get("role") == "user":
            return text_of(message)
    return None


def score_file(spec: str) -> tuple[str | None, Path]:
    """(label, path) of an eval.py --score argument: FILE, or LABEL=FILE to name the file's system LABEL (two
    runs' predictions.jsonl both call theirs `finetuned`)."""
    label, _, rest = spec.partition("=")
    if rest and "/" not in label and not Path(spec).exists():
        return label, Path(rest)
    return None, Path(spec)


def labelled(answers: dict, thoughts: dict, label: str | None) -> tuple[dict, dict]:
    """A file's systems under its --score LABEL: LABEL for a file of one system, "LABEL NAME" for several."""
    if not label:
        return answers, thoughts
    renamed = {name: label if len(answers) == 1 else f"{label} {name}" for name in answers}
    return ({renamed[name]: answer for name, answer in answers.items()},
            {renamed[name]: thought for name, thought in thoughts.items()})


def answers_of(row: dict, path: Path, where: str) -> tuple[dict, dict, list[str]]:
    """({system: answer}, {system: think block kept apart}, references) of one file row."""
    if isinstance(row.get("systems"), dict) and "references" in row:  # eval.py's predictions.jsonl
        answers = {name: found.get("answer", "") for name, found in row["systems"].items()}
        thoughts = {name: found["think"] for name, found in row["systems"].items() if "think" in found}
        return answers, thoughts, [str(r) for r in row["references"]]
    if "prediction" not in row:
        raise UserError(f"{where}: no \"prediction\"; a row needs the system's answer as \"prediction\" and the "
                        "reference as \"answer\", \"answers\" or \"messages\"")
    references = references_of(row)
    if not references:
        raise UserError(f"{where}: no reference answer; give \"answer\", \"answers\" (a list) or \"messages\" with "
                        "an assistant turn")
    return {str(row.get("system") or path.name.removesuffix(".jsonl")): row["prediction"]}, {}, references


def pairing_key(row: dict, question, image, name: str, seen: dict, where: str) -> str:
    """The key a system's answer is matched on across systems and files: id, else image + question, else the
    row's position among the system's rows."""
    if row.get("id") is not None:
        base = ("id", str(row["id"]))
    elif question is not None:
        base = ("question", str(image), question)
    else:
        base = ("position",)
    nth = seen.get((name, *base), 0)
    seen[(name, *base)] = nth + 1
    if base[0] == "id" and nth:
        raise UserError(f"{where}: id {row['id']!r} appears twice for system {name!r}; ids must be unique within a "
                        "system")
    return json.dumps([*base, nth])


def read_predictions(paths: list[Path], metric: str = "relaxed_accuracy", relaxed_rule: str = "chartqa",
                     labels=()) -> tuple[list[dict], list[str]]:
    """Scored rows and system names from prediction files (see the module's docstring), judged under `metric`;
    `labels[i]`, when given, names path i's system."""
    by_key: dict[str, dict] = {}
    names: list[str] = []
    for index, path in enumerate(paths):
        label = labels[index] if index < len(labels) else None
        seen: dict[tuple, int] = {}
        for line, where, row in jsonl_rows(path, "--score"):
            answers, thoughts, references = answers_of(row, path, where)
            answers, thoughts = labelled(answers, thoughts, label)
            image = row.get("image") or (row.get("images") or [None])[0]
            if isinstance(image, str) and not Path(image).is_absolute():
                image = str(path.parent / image)
            question = question_of(row)
            for name, prediction in answers.items():
                entry = by_key.setdefault(pairing_key(row, question, image, name, seen, where), {
                    "id": str(row["id"]) if row.get("id") is not None else f"{path.name}:{line}",
                    **({"question": question} if question is not None else {}),
                    **({"image": image} if isinstance(image, str) else {}),
                    **{k: row[k] for k in GROUPS if row.get(k) is not None}, "references": references, "systems": {}})
                if entry["references"] != references:
                    raise UserError(f"{where}: question {entry['id']!r} has references {references} here but "
                                    f"{entry['references']} in an earlier row; the systems must answer the same "
                                    "questions")
                if name in entry["systems"]:
                    raise UserError(f"{where}: system {name!r} answers question {entry['id']!r} twice")
                names += [name] if name not in names else []
                # scored after any think block, as eval.py scores its own answers (which it kept apart)
                entry["systems"][name] = verdict(prediction, references, metric, relaxed_rule, thoughts.get(name))
    if not by_key:
        raise UserError(f"--score {', '.join(map(str, paths))}: no rows")
    return list(by_key.values()), names
