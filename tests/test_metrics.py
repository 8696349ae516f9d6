"""Relaxed accuracy (ChartQA's reference rule and the lenient one), exact match, intervals and McNemar's test,
on cases worked out by hand from the rules' definitions."""

import math
import random

import pytest

from kit.evaluate.scoring import (
    accuracy,
    bootstrap_interval,
    exact_correct,
    grouped_accuracy,
    mcnemar_exact,
    paired_counts,
    reference_number,
    relaxed_correct,
    relaxed_correctness,
    relaxed_match,
    to_number,
)

# --- ChartQA's reference rule (pix2struct relaxed_correctness) ------------------------------------------------
# pix2struct's metrics_test.py scores these 8 predictions against these targets. By the rule, one at a time:
PIX2STRUCT_CASES = [
    ("abc", ["abc"], True),  # text, equal
    ("abc", ["Abc"], True),  # text, equal ignoring case
    ("Abc", ["abc"], True),
    ("100%", ["96%"], True),  # 1.00 against 0.96: 0.04 / 0.96 = 4.2 % off
    ("100%", ["94%"], False),  # 1.00 against 0.94: 0.06 / 0.94 = 6.4 % off
    ("100%", ["0.96"], True),  # "%" is /100, so 1.00 against 0.96 again
    ("100%", ["0.94"], False),
    ("Don't", ["Won't"], False),  # text, different
]


@pytest.mark.parametrize("prediction, targets, right", PIX2STRUCT_CASES)
def test_reference_rule_on_pix2struct_cases(prediction, targets, right):
    assert relaxed_correct(prediction, targets, "chartqa") is right


def test_pix2struct_cases_relaxed_accuracy():
    """5 of the 8 are right under the reference rule: 62.5 %, the figure pix2struct's test expects. The lenient
    rule reads "100%" as 100, so it gets "100%" vs "0.96" wrong: 4 of 8."""
    reference = [relaxed_correct(p, t, "chartqa") for p, t, _ in PIX2STRUCT_CASES]
    lenient = [relaxed_correct(p, t, "lenient") for p, t, _ in PIX2STRUCT_CASES]
    assert 100 * accuracy(reference) == 62.5
    assert 100 * accuracy(lenient) == 50.0
    assert [r and not n for r, n in zip(reference, lenient)] == [False] * 5 + [True, False, False]


@pytest.mark.parametrize("prediction, target, right", [
    ("105", "100", True),  # exactly 5 % off still counts
    ("105.1", "100", False),
    ("95.2", "100", True),  # 4.8 / 100
    ("100", "95.2", False),  # 4.8 / 95.2 = 5.04 %: the tolerance is relative to the target, not symmetric
    ("-10.4", "-10", True),  # relative to |target|
    ("10", "-10", False),
    ("45%", "0.45", True),  # "%" means /100...
    ("45%", "45", False),  # ...so 0.45 is not 45
    ("45", "45%", False),
    ("46%", "45%", True),  # 0.46 vs 0.45: 2.2 % off
    ("0", "0", True),  # a target of 0 is not a number to the rule (it is falsy): compared as text
    ("0.0", "0", False),
    ("0", "0%", False),  # "0%" reads as 0.0, falsy too: "0" != "0%" as text
    ("12", "12.", True),  # float("12.") is 12
    ("1e2", "100", True),
    ("1_000", "1000", True),  # Python's float() reads "1_000", and float() is the rule's definition
    ("nan", "nan", False),  # a NaN target is truthy and nothing is within 5 % of it
    ("inf", "inf", False),  # inf - inf is NaN
    ("Yes", "yes", True),  # text: case ignored...
    ("Norway.", "Norway", False),  # ...and nothing else
    ("No way", "Norway", False),
    ("", "", True),
    ("", "0", False),
])
def test_reference_rule(prediction, target, right):
    assert relaxed_correctness(target, prediction) is right
    assert relaxed_correct(prediction, [target], "chartqa") is right


def test_reference_rule_strips_the_prediction_only():
    # answers are stripped before scoring (as Qwen-VL's and InternVL's ChartQA scripts do); targets are not
    assert relaxed_correct(" Yes\n", ["yes"], "chartqa")
    assert not relaxed_correct("yes", [" yes"], "chartqa")
    assert relaxed_correct("12", [" 12 "], "chartqa")  # as a number, float() ignores the spaces


def test_reference_number():
    assert reference_number("45%") == 0.45
    assert reference_number("45%%") == 0.45  # every trailing "%" goes
    assert reference_number(" 3 ") == 3
    assert reference_number("3 %") == 0.03
    assert reference_number("3% ") is None  # ends with a space, not "%": float("3% ") fails
    assert reference_number("12 apples") is None
    assert reference_number("") is None and reference_number("%") is None
    assert math.isnan(reference_number("nan"))


# --- the lenient rule ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction, reference, right", [
    ("104.9", "100", True),  # 4.9 % off
    ("95.1", "100", True),  # 4.9 % under
    ("105.1", "100", False),  # 5.1 % off
    ("94.9", "100", False),  # 5.1 % under
    ("21", "20", True),  # exactly 5 % off still counts
    ("-10.4", "-10", True),  # the tolerance is on |reference|
    ("10", "-10", False),
    ("0", "0", True),  # a reference of 0 must be met exactly...
    ("0.0", "0", True),  # ...as a number
    ("0.001", "0", False),
    ("45%", "45", True),  # "%" is dropped from both, unlike pix2struct's /100
    ("45", "45%", True),
    ("0.45", "45%", False),
    ("46.5%", "45%", True),  # 3.3 % off
    ("12.", "12", True),  # a trailing period
    ("1e2", "100", True),
])
def test_relaxed_match_numbers(prediction, reference, right):
    assert relaxed_match(prediction, reference) is right
    assert relaxed_correct(prediction, [reference], "lenient") is right


@pytest.mark.parametrize("prediction, reference, right", [
    ("Yes", "yes", True),  # case is ignored
    ("  Norway. ", "norway", True),  # whitespace and a trailing period
    ("Norway!", "Norway", False),
    ("No way", "Norway", False),
    ("Norway", "Norwa", False),  # strings get no tolerance
    ("nan", "nan", True),  # not numbers: compared as text, so a NaN is not "never equal"
    ("inf", "1e400", False),
    ("1_000", "1000", False),  # Python's float() would read "1_000"; an answer with "_" is text
    ("", "", True),
    ("", "0", False),
    ("0", "", False),
])
def test_relaxed_match_strings(prediction, reference, right):
    assert relaxed_match(prediction, reference) is right


@pytest.mark.parametrize("metric", ["chartqa", "lenient"])
def test_several_references_any_counts(metric):
    assert relaxed_correct("Spain", ["France", "spain"], metric)
    assert relaxed_correct("31", ["30", "thirty"], metric)  # 3.3 % off the first
    assert not relaxed_correct("40", ["30", "thirty"], metric)
    assert not relaxed_correct("anything", [], metric)  # no reference: nothing can be right


def test_default_rule_is_the_reference():
    assert relaxed_correct("100%", ["0.96"]) and not relaxed_correct("45%", ["45"])
    with pytest.raises(ValueError):
        relaxed_correct("1", ["1"], "strict")


def test_exact_match_has_no_numeric_tolerance():
    assert exact_correct("104", ["100", "104"])
    assert exact_correct("A.", ["a"])
    assert not exact_correct("104.9", ["100"])
    assert not exact_correct("45%", ["45"])
    assert relaxed_correct("45%", ["45"], "lenient")


def test_to_number():
    assert to_number(" 12.5 ") == 12.5
    assert to_number("45 %") == 45
    assert to_number("-.5") == -0.5
    assert to_number("12 apples") is None
    assert to_number("") is None
    assert to_number("infinity") is None


def test_accuracy_and_groups():
    rows = [{"qtype": "count", "ok": True}, {"qtype": "count", "ok": False}, {"qtype": "max", "ok": True},
            {"ok": False}]
    assert accuracy([row["ok"] for row in rows]) == 0.5
    assert accuracy([]) is None
    assert grouped_accuracy(rows, lambda row: row["ok"], "qtype") == {"count": 0.5, "max": 1.0}
    assert grouped_accuracy(rows, lambda row: row["ok"], "subset") == {}


# --- uncertainty --------------------------------------------------------------------------------------------
def test_paired_counts():
    baseline = [True, True, False, False, False]
    candidate = [True, False, True, True, False]
    assert paired_counts(baseline, candidate) == {"fixed": 2, "broken": 1, "both_right": 1, "both_wrong": 1}
    with pytest.raises(ValueError):
        paired_counts([True], [True, False])


def binomial_two_sided(fixed: int, broken: int) -> float:
    """The same test the long way: the probability, under Binomial(n, 1/2), of every outcome no more likely than
    the one observed (for this symmetric distribution, those as far from n/2 or further)."""
    n = fixed + broken
    probability = [math.comb(n, k) / 2 ** n for k in range(n + 1)]
    return min(1.0, sum(p for p in probability if p <= probability[fixed] * (1 + 1e-9)))


@pytest.mark.parametrize("fixed, broken, by_hand", [
    (0, 0, 1.0),  # nothing changed: no evidence either way
    (5, 0, 2 / 32),  # n = 5, all one way: 2 * (1/2)^5
    (10, 2, 2 * (1 + 12 + 66) / 4096),  # n = 12: 2 * P(X <= 2)
    (3, 3, 1.0),  # a tie: 2 * P(X <= 3) = 1.31, capped at 1
    (1, 0, 1.0),  # a single change can never be significant
])
def test_mcnemar_exact(fixed, broken, by_hand):
    assert mcnemar_exact(fixed, broken) == pytest.approx(by_hand, rel=1e-12)
    assert mcnemar_exact(broken, fixed) == mcnemar_exact(fixed, broken)  # two-sided: symmetric
    assert mcnemar_exact(fixed, broken) == pytest.approx(binomial_two_sided(fixed, broken), rel=1e-9)


def test_mcnemar_exact_on_many_questions():
    # thousands of discordant questions: exact integers, no overflow, and the same as the long way
    assert mcnemar_exact(540, 460) == pytest.approx(binomial_two_sided(540, 460), rel=1e-9)
    assert 0.01 < mcnemar_exact(540, 460) < 0.02  # 54 % of changes one way over 1,000 is z = 2.5
    assert mcnemar_exact(3000, 2000) < 1e-40


def test_bootstrap_interval():
    rng = random.Random(1)
    flags = [rng.random() < 0.7 for _ in range(200)]
    low, high = bootstrap_interval(flags)
    share = accuracy(flags)
    assert low < share < high
    # close to the normal approximation +- 1.96 * sqrt(p(1-p)/n) (6.4 points here)
    half = 1.96 * math.sqrt(share * (1 - share) / len(flags))
    assert (high - low) / 2 == pytest.approx(half, rel=0.15)
    assert bootstrap_interval(flags) == (low, high)  # fixed seed: the same interval every time
    assert bootstrap_interval(flags, seed=1) != (low, high)
    # four times the questions, half the width
    assert (lambda lo_hi: lo_hi[1] - lo_hi[0])(bootstrap_interval(flags * 4)) == pytest.approx((high - low) / 2,
                                                                                              rel=0.2)
    assert bootstrap_interval([True] * 50) == (1.0, 1.0)  # every resample is all right
    assert bootstrap_interval([]) is None
