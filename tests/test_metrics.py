"""Relaxed accuracy and exact match on cases worked out by hand."""

import pytest

from kit.metrics import accuracy, exact_correct, grouped_accuracy, relaxed_correct, relaxed_match, to_number


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


def test_several_references_any_counts():
    assert relaxed_correct("Spain", ["France", "spain"])
    assert relaxed_correct("31", ["30", "thirty"])  # 3.3 % off the first
    assert not relaxed_correct("40", ["30", "thirty"])
    assert not relaxed_correct("anything", [])  # no reference: nothing can be right


def test_exact_match_has_no_numeric_tolerance():
    assert exact_correct("104", ["100", "104"])
    assert exact_correct("A.", ["a"])
    assert not exact_correct("104.9", ["100"])
    assert not exact_correct("45%", ["45"])
    assert relaxed_correct("45%", ["45"])


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
