"""ChartQA's relaxed accuracy (as in pix2struct) and exact match, and accuracy per group of samples.

Relaxed: a prediction is right if it and a reference both read as numbers and differ by at most 5 % of the
reference (a reference of 0 must be met exactly), otherwise if the two strings are equal ignoring case,
surrounding whitespace and a trailing period. "%" is dropped from both before reading a number, so "45%"
and "45" agree (pix2struct divides "45%" by 100 and would call them different). Several references: the
prediction is right if it matches any of them.
"""

import math
import re

RELAXED_TOLERANCE = 0.05
NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")


def normalize(text: str) -> str:
    """Lower case, without surrounding whitespace and one trailing period."""
    text = str(text).strip()
    if text.endswith("."):
        text = text[:-1].rstrip()
    return text.lower()


def to_number(text: str) -> float | None:
    """The number `text` spells (a "%" sign ignored), or None; "nan", "inf" and "1_000" are not numbers."""
    text = normalize(text).replace("%", "").strip()
    if not NUMBER.fullmatch(text):
        return None
    value = float(text)
    return value if math.isfinite(value) else None


def relaxed_match(prediction: str, reference: str, tolerance: float = RELAXED_TOLERANCE) -> bool:
    predicted, expected = to_number(prediction), to_number(reference)
    if predicted is not None and expected is not None:
        if expected == 0:
            return predicted == 0
        return abs(predicted - expected) / abs(expected) <= tolerance
    return normalize(prediction) == normalize(reference)


def relaxed_correct(prediction: str, references: list[str]) -> bool:
    return any(relaxed_match(prediction, reference) for reference in references)


def exact_correct(prediction: str, references: list[str]) -> bool:
    """Equal to a reference ignoring case, surrounding whitespace and a trailing period; no number tolerance."""
    return any(normalize(prediction) == normalize(reference) for reference in references)


def accuracy(flags: list[bool]) -> float | None:
    """Share of True in `flags`; None for no samples (shown as "-", never as 0 %)."""
    return sum(flags) / len(flags) if flags else None


def grouped_accuracy(rows: list[dict], flag, group_key: str) -> dict[str, float]:
    """{group: accuracy} over rows that carry `group_key`; `flag(row)` says whether a row is right."""
    groups: dict[str, list[bool]] = {}
    for row in rows:
        if row.get(group_key) is not None:
            groups.setdefault(str(row[group_key]), []).append(flag(row))
    return {group: accuracy(flags) for group, flags in sorted(groups.items())}
