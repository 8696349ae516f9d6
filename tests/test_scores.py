"""The task metrics (kit/evaluate/task_metrics.py) against their reference implementations' own published examples,
and the report's intervals and paired comparisons recomputed from the verdicts.

Sources of the expected numbers:
- ANLS: the ST-VQA paper's "Coca Cola" example as shunk031/ANLS's tests state it (1 - NL against "Coca Cola" and
  "Coca Cola Company", and the thresholded score, both to 2 decimals);
- CER / WER: jiwer's own tests (tests/test_cer.py, tests/test_wer.py: "This is a test" vs "This test" = 5/14
  and 0.5, the corpus ["i", "am i good"] vs ["i am", "i good"] = 0.6, and the "From WER and RIL to MER and WIL"
  cases);
- ROUGE-L: rouge-score's rouge_scorer_test.py (testRougeLConsecutive / testRougeLNonConsecutive: F = 4/5).
"""

import pytest

from kit.evaluate import task_metrics
from kit.evaluate.scoring import bootstrap_interval, mcnemar_exact
from recipes import CHOICES

COCA_COLA = ["Coca Cola", "Coca Cola Company"]


@pytest.mark.parametrize("prediction, anls", [("The Coca", 0.00), ("CocaCola", 0.89), ("Coca cola", 1.00),
                                              ("Cola", 0.00), ("Cat", 0.00)])
def test_anls_on_the_st_vqa_coca_cola_example(prediction, anls):
    assert task_metrics.anls(prediction, COCA_COLA) == pytest.approx(anls, abs=0.005)


@pytest.mark.parametrize("prediction, first, second", [("The Coca", 0.44, 0.29), ("CocaCola", 0.89, 0.47),
                                                       ("Coca cola", 1.00, 0.53), ("Cola", 0.44, 0.23),
                                                       ("Cat", 0.22, 0.12)])
def test_anls_similarity_before_its_threshold(prediction, first, second):
    """Without the 0.5 threshold each reference's similarity is 1 - NL, as the example's table lists it."""
    assert task_metrics.anls(prediction, [COCA_COLA[0]], threshold=1.01) == pytest.approx(first, abs=0.006)
    assert task_metrics.anls(prediction, [COCA_COLA[1]], threshold=1.01) == pytest.approx(second, abs=0.006)


@pytest.mark.parametrize("reference, hypothesis, cer", [
    ("This is a test", "This is a test", 0 / 14), ("This is a test", "", 14 / 14),
    ("This is a test", "This test", 5 / 14),
    # test_known_values (from "From WER and RIL to MER and WIL"), on characters
    ("X", "X", 0), ("X", "X X Y Y", 6), ("X Y X", "X Z", 3 / 5), ("X", "Y", 1), ("X", "Y Z", 3)])
def test_cer_on_jiwers_cases(reference, hypothesis, cer):
    verdict = task_metrics.verdicts(hypothesis, [reference], "cer")
    assert verdict["cer"] == pytest.approx(cer, abs=1e-12)
    assert verdict["cer_length"] == len(reference)


@pytest.mark.parametrize("reference, hypothesis, wer", [("This is a test", "This is a test", 0),
                                                        ("This is a test", "", 1),
                                                        ("This is a test", "This test", 0.5)])
def test_wer_on_jiwers_cases(reference, hypothesis, wer):
    assert task_metrics.verdicts(hypothesis, [reference], "wer")["wer"] == pytest.approx(wer, abs=1e-12)


def test_corpus_cer_is_all_edits_over_all_reference_characters():
    """jiwer's corpus example: ["i", "am i good"] against ["i am", "i good"] is 0.6 (6 edits over 10 characters),
    not the mean of the two questions' rates (3.0 and 0.33)."""
    verdicts = [task_metrics.verdicts(h, [r], "cer") for r, h in [("i", "i am"), ("am i good", "i good")]]
    assert task_metrics.score(verdicts, "cer")["value"] == pytest.approx(0.6, abs=1e-12)
    assert task_metrics.score(verdicts, "wer")["value"] == pytest.approx(0.5, abs=1e-12)  # 2 edits over 4 words


@pytest.mark.parametrize("prediction", ["testing one", "testing two"])
def test_rouge_l_on_rouge_scores_cases(prediction):
    assert task_metrics.rouge_l(prediction, ["testing one two"]) == pytest.approx(4 / 5)


def test_several_references_take_the_closest():
    assert task_metrics.rouge_l("testing one", ["something else", "testing one two"]) == pytest.approx(4 / 5)
    verdict = task_metrics.verdicts("abc", ["abd", "xxxxxx"], "cer")
    assert (verdict["cer_errors"], verdict["cer_length"]) == (1, 3)
    assert task_metrics.anls("CocaCola", list(reversed(COCA_COLA))) == task_metrics.anls("CocaCola", COCA_COLA)


@pytest.mark.parametrize("prediction, reference, same", [
    (r"\frac{a}{b}", r"\frac { a } { b }", True),  # spacing around braces means nothing in LaTeX
    (r"x+y", r"x + y", True),
    (r"\alpha b", r"\alphab", False),  # a space that ends a command name is part of the formula
    ("12", "1 2", False),
    ("Hello  world", "Hello world", True),
    ("hello world", "Hello world", False),  # OCR keeps case
])
def test_ocr_exact_match_normalizes_spacing_only(prediction, reference, same):
    assert task_metrics.verdicts(prediction, [reference], "cer")["exact"] is same


def test_every_metric_is_a_recipe_choice_and_a_reward():
    assert set(CHOICES["metric_for_best_model"]) == set(task_metrics.METRICS) == set(task_metrics.REPORTED)
    for metric in task_metrics.METRICS:
        assert task_metrics.reward(metric, "Coca Cola", COCA_COLA) == 1.0  # a perfect answer earns the full reward
        assert 0.0 <= task_metrics.reward(metric, "Cat", COCA_COLA) < 1.0
    assert task_metrics.reward("cer", "This test", ["This is a test"]) == pytest.approx(1 - 5 / 14)
    assert task_metrics.reward("cer", "x" * 50, ["ab"]) == 0.0  # an error rate over 100 % is no reward, never negative


def test_intervals_and_paired_comparison_of_a_continuous_metric():
    """Intervals contain the value; the paired change is the difference of the two systems' values, better and
    worse count questions by the metric's direction (lower CER is better), and the sign test is McNemar's formula."""
    references = ["This is a test", "x + y", "hello", "abc", "formula"]
    before = [task_metrics.verdicts(p, [r], "cer") for p, r in zip(["This", "x", "help", "abc", "form"], references,
                                                                  strict=True)]
    after = [task_metrics.verdicts(p, [r], "cer") for p, r in zip(["This is a test", "x + y", "hell", "abd", "formula"],
                                                             references, strict=True)]
    for verdicts in (before, after):
        found = task_metrics.score(verdicts, "cer")
        assert found["low"] <= found["value"] <= found["high"] and found["samples"] == 5
    compared = task_metrics.compare(before, after, "cer")
    values = [task_metrics.score(verdicts, "cer")["value"] for verdicts in (before, after)]
    assert compared["change"] == pytest.approx(values[1] - values[0])
    assert compared["change_low"] <= compared["change"] <= compared["change_high"] < 0
    # "hell" is nearer "hello" than "help" is; "abd" breaks "abc"
    assert (compared["better"], compared["worse"], compared["ties"]) == (4, 1, 0)
    assert compared["sign_test_p"] == mcnemar_exact(4, 1)


def test_flag_metrics_keep_the_chart_report():
    before = [{"relaxed": r, "exact": False} for r in [False] * 6 + [True] * 2]
    after = [{"relaxed": r, "exact": False} for r in [True] * 7 + [False]]
    compared = task_metrics.compare(before, after, "relaxed_accuracy")
    assert (compared["fixed"], compared["broken"]) == (6, 1) and compared["mcnemar_p"] == mcnemar_exact(6, 1)
    low, high = bootstrap_interval([int(a["relaxed"]) - int(b["relaxed"]) for a, b in zip(after, before, strict=True)])
    assert (compared["change_low"], compared["change_high"]) == (low, high)
    assert task_metrics.score(after, "relaxed_accuracy")["accuracy"] == 7 / 8
