"""Relaxed accuracy (ChartQA's reference rule, or the kit's lenient one), exact match, and how sure each number is.

Rules for "relaxed accuracy" (`--metric`):

    chartqa  ChartQA's reference, pix2struct's `relaxed_correctness`: both strings are read with Python's
             float(), a trailing "%" meaning /100 ("45%" is 0.45); if both are numbers and the reference is not
             0, the prediction is right within 5 % of the reference; otherwise the strings must be equal
             ignoring case (and nothing else). Published ChartQA numbers use this rule.
    lenient  for answers written without units: "%" is dropped rather than divided ("45%" and "45" agree),
             surrounding whitespace and one trailing period are ignored in text answers, and a reference of 0 must
             be met exactly as a number ("0.0" is right).

Under both, the prediction's surrounding whitespace is removed first (as Qwen-VL's and InternVL's ChartQA
scripts do) and a prediction is right if it matches any of the references.

Uncertainty: a percentile bootstrap interval for each accuracy, and for two systems answering the same
questions the paired counts and McNemar's exact (binomial, two-sided) p-value.
"""

import math
import re

RELAXED_TOLERANCE = 0.05
NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")
METRICS = {
    "chartqa": "ChartQA's reference rule (pix2struct relaxed_correctness: 5 % numeric tolerance, \"%\" read as "
               "/100, text equal ignoring case)",
    "lenient": "the kit's lenient rule (5 % numeric tolerance, \"%\" dropped, text equal ignoring case, "
               "surrounding whitespace and a trailing period)",
}
EXACT = "exact match: equal to a reference ignoring case, surrounding whitespace and a trailing period"
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0


# --- ChartQA's reference rule ----------------------------------------------------------------------------
def reference_number(text: str) -> float | None:
    """The number the reference rule reads: float(text), or float(text without trailing "%"s) / 100; else None.

    Python's float() is the definition here, so " 12 ", "1_000", "1e2", "nan" and "inf" are numbers too."""
    try:
        return float(text.rstrip("%")) / 100 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_correctness(target: str, prediction: str, max_relative_change: float = RELAXED_TOLERANCE) -> bool:
    """ChartQA's reference rule for one reference (`target`), argument order as in pix2struct."""
    predicted, expected = reference_number(prediction), reference_number(target)
    if predicted is not None and expected:  # a reference of 0 (falsy) is compared as text
        return abs(predicted - expected) / abs(expected) <= max_relative_change
    return prediction.lower() == target.lower()


# --- the kit's lenient rule ------------------------------------------------------------------------------
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
    """The lenient rule for one reference."""
    predicted, expected = to_number(prediction), to_number(reference)
    if predicted is not None and expected is not None:
        if expected == 0:
            return predicted == 0
        return abs(predicted - expected) / abs(expected) <= tolerance
    return normalize(prediction) == normalize(reference)


# --- per question ----------------------------------------------------------------------------------------
def split_think(text: str, markers) -> tuple[str | None, str]:
    """(thinking, answer) of a model's reply: a leading think block (`markers`: (open, close) pairs such as
    ("<think>", "</think>")) is not part of the answer that is scored. A reply that closes a block it did not open
    (the prompt opened it) counts as thinking too; one that never closes its block gave no answer. thinking is None
    when the reply has no think block."""
    for start, end in markers:
        opened = text.lstrip().startswith(start)
        if end in text:
            thought, _, answer = text.partition(end)
            return thought.replace(start, "", 1).strip(), answer.strip()
        if opened:
            return text.lstrip()[len(start):].strip(), ""
    return None, text


def relaxed_correct(prediction: str, references: list[str], metric: str = "chartqa") -> bool:
    """Right under `metric` ("chartqa" or "lenient") against any of `references`."""
    prediction = str(prediction).strip()
    if metric == "chartqa":
        return any(relaxed_correctness(str(reference), prediction) for reference in references)
    if metric == "lenient":
        return any(relaxed_match(prediction, str(reference)) for reference in references)
    raise ValueError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")


def exact_correct(prediction: str, references: list[str]) -> bool:
    """Equal to a reference ignoring case, surrounding whitespace and a trailing period; no number tolerance."""
    return any(normalize(prediction) == normalize(reference) for reference in references)


# --- over questions --------------------------------------------------------------------------------------
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


def bootstrap_interval(values: list, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                       level: float = 0.95) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the mean of `values` (right/wrong flags: the accuracy; per-question
    differences of two systems: the change): `resamples` draws of len(values) questions with replacement, fixed
    `seed`. None for no samples. All right (or all wrong) gives a zero-width interval."""
    if not values:
        return None
    import numpy as np

    values = np.asarray(values, dtype=np.float64)
    draws = np.random.default_rng(seed).integers(0, len(values), size=(resamples, len(values)))
    means = values[draws].mean(axis=1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def paired_counts(baseline: list[bool], candidate: list[bool]) -> dict[str, int]:
    """How the candidate did on the baseline's questions: fixed (baseline wrong, candidate right), broken
    (baseline right, candidate wrong), both right, both wrong. The two lists are the same questions in order."""
    if len(baseline) != len(candidate):
        raise ValueError("paired counts need the same questions for both systems")
    pairs = list(zip(baseline, candidate))
    return {"fixed": sum(not b and c for b, c in pairs), "broken": sum(b and not c for b, c in pairs),
            "both_right": sum(b and c for b, c in pairs), "both_wrong": sum(not b and not c for b, c in pairs)}


def mcnemar_exact(fixed: int, broken: int) -> float:
    """McNemar's exact test, two-sided: under "no difference" each of the n = fixed + broken discordant
    questions is fixed or broken with probability 1/2, so p = P(Binomial(n, 1/2) as far from n/2 as observed),
    i.e. 2 * P(X <= min(fixed, broken)), at most 1. No discordant questions: p = 1."""
    n = fixed + broken
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(fixed, broken) + 1))
    return min(1.0, 2 * tail / 2 ** n)  # exact integers until this one division
