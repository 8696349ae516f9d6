"""The task's metric: one rule a recipe names (`metric_for_best_model`) that eval.py reports, training keeps the
best checkpoint by, eval.py --score applies to any tool's answers, and GRPO rewards.

    relaxed_accuracy  charts: ChartQA's relaxed accuracy (kit/evaluate/scoring.py), reported with exact match
    exact_match       short answers that must match: equal ignoring case, surrounding whitespace and a final period
    anls              documents (DocVQA, InfoVQA): average normalized Levenshtein similarity, 0.5 threshold, the best
                      of the references; reported with exact match
    cer, wer          OCR and LaTeX: character / word error rate (jiwer), reported with each other and exact match
                      after spacing is normalized (see `spacing`)
    rougeL            free answers: ROUGE-L F1 (rouge-score), a text-overlap score, reported with exact match

Every question gets each reported metric's verdict (`verdicts`); a report aggregates them over questions
(`score`, `compare`): flags and similarities by their mean, error rates as jiwer does over a corpus (all edits over all
reference characters or words), so a long formula weighs more than a short one.
"""

import re

from kit.evaluate.scoring import (
    BOOTSTRAP_RESAMPLES,
    BOOTSTRAP_SEED,
    accuracy,
    bootstrap_interval,
    exact_correct,
    mcnemar_exact,
    paired_counts,
    relaxed_correct,
)

# name (the recipe's value) -> (key in predictions.jsonl / report.json, kind, higher is better, label, rule)
# kinds: flag (right or wrong), mean (a similarity in [0, 1] a question), rate (errors over reference length)
METRICS = {
    "relaxed_accuracy": ("relaxed", "flag", True, "relaxed acc", "ChartQA's relaxed accuracy"),
    "exact_match": ("exact", "flag", True, "exact match", "exact match"),
    "anls": ("anls", "mean", True, "ANLS", "ANLS (DocVQA's rule: 1 - normalized Levenshtein distance to the closest "
                                           "reference, lower case, spaces collapsed; 0 when that distance is 0.5 "
                                           "or more)"),
    "cer": ("cer", "rate", False, "CER", "character error rate (jiwer: edits / reference characters over all "
                                         "questions; the closest reference of each)"),
    "wer": ("wer", "rate", False, "WER", "word error rate (jiwer: edits / reference words over all questions; the "
                                         "closest reference of each)"),
    "rougeL": ("rougeL", "mean", True, "ROUGE-L F1", "ROUGE-L F1, a text-overlap score (rouge-score, no stemming; "
                                                     "the best reference)"),
}
# what a report shows beside the recipe's metric, first column first
REPORTED = {"relaxed_accuracy": ("relaxed_accuracy", "exact_match"), "exact_match": ("exact_match",),
            "anls": ("anls", "exact_match"), "cer": ("cer", "wer", "exact_match"),
            "wer": ("wer", "cer", "exact_match"), "rougeL": ("rougeL", "exact_match")}
ANLS_THRESHOLD = 0.5  # DocVQA / ST-VQA: farther than this, the answer was a wrong one, not a misread right one
EXACT_RULES = {
    "answer": "equal to a reference ignoring case, surrounding whitespace and a trailing period",
    "spacing": "equal to a reference once spacing is normalized (whitespace dropped, except one space "
               "between two letters or digits: \"\\frac { a } { b }\" = \"\\frac{a}{b}\", \"\\alpha b\" != "
               "\"\\alphab\"); case kept",
}


def key(metric: str) -> str:
    return METRICS[metric][0]


def kind(metric: str) -> str:
    return METRICS[metric][1]


def higher_is_better(metric: str) -> bool:
    return METRICS[metric][2]


def label(metric: str, relaxed_rule: str = "chartqa") -> str:
    return f"relaxed acc ({relaxed_rule})" if metric == "relaxed_accuracy" else METRICS[metric][3]


def exact_rule(primary: str) -> str:
    """OCR and LaTeX answers are judged on their characters (spacing aside); short answers ignoring case."""
    return "spacing" if primary in ("cer", "wer") else "answer"


def rules(primary: str, relaxed_rule: str = "chartqa") -> dict:
    """{report key: the rule in words} for every metric a report of `primary` shows."""
    from kit.evaluate.scoring import METRICS as RELAXED_RULES

    found = {}
    for metric in REPORTED[primary]:
        if metric == "relaxed_accuracy":
            found[key(metric)] = f"relaxed accuracy under {RELAXED_RULES[relaxed_rule]}"
        elif metric == "exact_match":
            found[key(metric)] = EXACT_RULES[exact_rule(primary)]
        else:
            found[key(metric)] = METRICS[metric][4]
    return found


# --- one answer ----------------------------------------------------------------------------------------------
def spacing(text: str) -> str:
    """Whitespace dropped except a single space between two letters or digits (where it separates words or a
    LaTeX command from a letter); the rule exact match follows for OCR and LaTeX."""
    return re.sub(r"\s+", lambda m: " " if _joins_words(m) else "", str(text).strip())


def _joins_words(match) -> bool:
    text, start, end = match.string, match.start(), match.end()
    return start > 0 and end < len(text) and text[start - 1].isalnum() and text[end].isalnum()


def anls(prediction: str, references: list[str], threshold: float = ANLS_THRESHOLD) -> float:
    """The question's ANLS: the best over references of 1 - NL (NL: Levenshtein distance over the longer string's
    length, rapidfuzz), 0 where NL >= threshold; both sides lower case with whitespace collapsed."""
    from rapidfuzz.distance import Levenshtein

    clean = lambda text: " ".join(str(text).lower().split())  # noqa: E731
    best = 0.0
    for reference in references:
        distance = Levenshtein.normalized_distance(clean(prediction), clean(reference))
        best = max(best, 1 - distance if distance < threshold else 0.0)
    return best


def errors(prediction: str, references: list[str], unit: str) -> tuple[int, int]:
    """(edits, reference length) against the reference with the lowest error rate, in characters (unit "cer") or
    words ("wer"), as jiwer counts them (substitutions + deletions + insertions). An empty reference counts the
    prediction's length as edits over a length of 0 (jiwer refuses it; a corpus still has a rate)."""
    import jiwer

    prediction = str(prediction).strip()
    best = None
    for reference in references:
        reference = str(reference).strip()
        if not reference:
            found = (len(prediction if unit == "cer" else prediction.split()), 0)
        else:
            out = (jiwer.process_characters if unit == "cer" else jiwer.process_words)(reference, prediction)
            found = (out.substitutions + out.deletions + out.insertions,
                     len(reference) if unit == "cer" else len(reference.split()))
        if best is None or found[0] * max(best[1], 1) < best[0] * max(found[1], 1):
            best = found
    return best


def rouge_l(prediction: str, references: list[str]) -> float:
    """ROUGE-L F1 (rouge-score's RougeScorer, its default tokenizer, no stemmer), the best reference."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    return max(scorer.score(str(reference), str(prediction))["rougeL"].fmeasure for reference in references)


def verdicts(prediction: str, references: list[str], primary: str, relaxed_rule: str = "chartqa") -> dict:
    """{report key: verdict} for every metric a report of `primary` shows; error rates also keep their counts
    ("cer_errors", "cer_length") so a corpus rate and its interval can be recomputed from predictions.jsonl."""
    found = {}
    for metric in REPORTED[primary]:
        if metric == "relaxed_accuracy":
            found["relaxed"] = relaxed_correct(prediction, references, relaxed_rule)
        elif metric == "exact_match":
            found["exact"] = exact_match(prediction, references, exact_rule(primary))
        elif metric == "anls":
            found["anls"] = anls(prediction, references)
        elif metric == "rougeL":
            found["rougeL"] = rouge_l(prediction, references)
        else:
            edits, length = errors(prediction, references, metric)
            found.update({metric: rate(edits, length), f"{metric}_errors": edits, f"{metric}_length": length})
    return found


def exact_match(prediction: str, references: list[str], rule: str = "answer") -> bool:
    if rule == "spacing":
        return any(spacing(prediction) == spacing(reference) for reference in references)
    return exact_correct(prediction, references)


def rate(edits: int, length: int) -> float:
    return edits / length if length else float(edits > 0)


def value(verdict: dict, metric: str) -> float:
    """A question's own number for `metric` (its error rate, similarity, or 1/0)."""
    return float(verdict[key(metric)])


def reward(metric: str, prediction: str, references: list[str]) -> float:
    """GRPO's reward for one answer under the task's metric, in [0, 1] and higher for better: a flag or similarity
    as it is, an error rate as 1 - rate (at least 0)."""
    verdict = verdicts(prediction, references, metric)
    number = value(verdict, metric)
    return max(0.0, 1.0 - number) if kind(metric) == "rate" else number


# --- over questions ------------------------------------------------------------------------------------------
def parts(verdicts_: list[dict], metric: str) -> tuple[list[float], list[float]]:
    """(numerators, denominators) whose sums' ratio is the metric over these questions: errors and reference
    lengths for a rate, else each question's value over 1."""
    if kind(metric) == "rate":
        return ([float(v[f"{metric}_errors"]) for v in verdicts_], [float(v[f"{metric}_length"]) for v in verdicts_])
    return [value(v, metric) for v in verdicts_], [1.0] * len(verdicts_)


def ratio_draws(numerators, denominators, draws):
    """The metric on each bootstrap draw (rows of question indices)."""
    import numpy as np

    top, bottom = np.asarray(numerators)[draws].sum(axis=1), np.asarray(denominators)[draws].sum(axis=1)
    return np.divide(top, bottom, out=(top > 0).astype(np.float64), where=bottom > 0)


def draws_for(n: int, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED):
    import numpy as np

    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def score(verdicts_: list[dict], metric: str, level: float = 0.95) -> dict:
    """{"value", "low", "high", "samples"} (and "accuracy", "right" for a flag): the metric over these questions
    and its percentile bootstrap interval over questions (kit/evaluate/scoring's resamples and seed)."""
    if kind(metric) == "flag":
        flags = [bool(v[key(metric)]) for v in verdicts_]
        interval = bootstrap_interval(flags)
        found = accuracy(flags)
        return {"value": found, "accuracy": found, "low": interval and interval[0], "high": interval and interval[1],
                "right": sum(flags), "samples": len(flags)}
    if not verdicts_:
        return {"value": None, "low": None, "high": None, "samples": 0}
    import numpy as np

    top, bottom = parts(verdicts_, metric)
    low, high = np.quantile(ratio_draws(top, bottom, draws_for(len(top))), [(1 - level) / 2, (1 + level) / 2])
    return {"value": rate(sum(top), sum(bottom)) if kind(metric) == "rate" else sum(top) / len(top),
            "low": float(low), "high": float(high), "samples": len(verdicts_)}


def compare(before: list[dict], after: list[dict], metric: str, level: float = 0.95) -> dict:
    """The candidate (`after`) against the baseline (`before`) on the same questions, in order. Right/wrong:
    paired counts and McNemar's exact p. Continuous: questions better / worse / tied (by the metric's direction)
    and the sign test's exact p (McNemar's formula on better against worse). Both: change (candidate minus
    baseline) with a paired bootstrap interval (the same questions resampled for both)."""
    if kind(metric) == "flag":
        b, a = [bool(v[key(metric)]) for v in before], [bool(v[key(metric)]) for v in after]
        counts = paired_counts(b, a)
        change = bootstrap_interval([int(x) - int(y) for x, y in zip(a, b, strict=True)])
        return {**counts, "change": (counts["fixed"] - counts["broken"]) / len(b), "change_low": change[0],
                "change_high": change[1], "mcnemar_p": mcnemar_exact(counts["fixed"], counts["broken"])}
    import numpy as np

    sign = 1 if higher_is_better(metric) else -1
    deltas = [sign * (value(x, metric) - value(y, metric)) for x, y in zip(after, before, strict=True)]
    better, worse = sum(d > 0 for d in deltas), sum(d < 0 for d in deltas)
    draws = draws_for(len(before))
    changes = ratio_draws(*parts(after, metric), draws) - ratio_draws(*parts(before, metric), draws)
    low, high = np.quantile(changes, [(1 - level) / 2, (1 + level) / 2])
    return {"better": better, "worse": worse, "ties": len(deltas) - better - worse,
            "change": score(after, metric)["value"] - score(before, metric)["value"], "change_low": float(low),
            "change_high": float(high), "sign_test_p": mcnemar_exact(better, worse)}


def changed(before: dict, after: dict, metric: str) -> str | None:
    """How one question moved: "fixed" / "broken" for a flag, "better" / "worse" for a number; None if unchanged."""
    b, a = value(before, metric), value(after, metric)
    if a == b:
        return None
    up = a > b if higher_is_better(metric) else a < b
    if kind(metric) == "flag":
        return "fixed" if up else "broken"
    return "better" if up else "worse"
