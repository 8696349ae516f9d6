"""The task's metric end to end: a latex_ocr-shaped run (formulas read off images, metric_for_best_model=cer)
selects its best checkpoint by held-out CER and eval.py reports CER, WER and exact match with intervals; --score
applies ANLS and ROUGE-L to answers another tool wrote; GRPO's reward is the same metric."""

import json

import jiwer
import pytest
from click.testing import CliRunner

import eval as evaluate
from kit.evaluate import task_metrics
from kit.train.grpo import relaxed_accuracy
from tests.conftest import read_jsonl, train_cli

FORMULAS = ["x^{2}", "a+b", "\\pi r", "e^{x}", "1/2", "y_{1}", "a-b=c", "f(x)", "n!", "2^{n}"]


def eval_cli(args):
    return CliRunner().invoke(evaluate.main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def formula_run(tmp_path_factory):
    """A short run of the tiny model on formula images (each character drawn in its own vision-token cell), with
    the latex_ocr recipe's metric: evaluated every 10 steps on held-out rows, the best checkpoint kept by CER."""
    from data.synthetic_text import render

    folder = tmp_path_factory.mktemp("formulas")
    rows = []
    for i in range(60):
        text = FORMULAS[i % len(FORMULAS)]
        render(text, 28 * len(text), 28, folder / f"{i}.png")
        rows.append({"images": [f"{i}.png"], "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Write the LaTeX."}]},
            {"role": "assistant", "content": [{"type": "text", "text": text}]}]})
    (folder / "formulas.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    run = folder / "run"
    settings = [f"dataset=jsonl:{folder / 'formulas.jsonl'}", "metric_for_best_model=cer", "max_pixels=6272",
                "max_completion_length=12", "eval_fraction=0.2", "eval_steps=10", "save_steps=10", "max_steps=30",
                "load_best_model_at_end=true", "logging_steps=10", "warmup_steps=5", "save_total_limit=5"]
    result = train_cli(["--recipe", "demo_ocr", "--output", str(run), *sum((["--set", s] for s in settings), [])])
    assert result.exit_code == 0, result.output
    return run


def test_training_keeps_the_checkpoint_with_the_lowest_heldout_cer(formula_run):
    evals = [row for row in read_jsonl(formula_run / "metrics.jsonl") if "eval_loss" in row]
    assert [row["eval_metric"] for row in evals] == ["cer"] * 3 and all(row["eval_cer"] >= 0 for row in evals)
    for row in evals:  # each logged CER is jiwer's over the answers it saved
        answers = read_jsonl(formula_run / "heldout_answers" / f"step-{row['step']}.jsonl")
        truth = [a["references"][0] for a in answers]
        said = [a["answer"].strip() for a in answers]
        assert row["eval_cer"] == pytest.approx(jiwer.cer(truth, said))
    state = json.loads(max((formula_run / "checkpoints").glob("checkpoint-*/trainer_state.json")).read_text())
    assert state["best_metric"] == pytest.approx(min(row["eval_cer"] for row in evals))  # lower is better


def test_eval_reports_cer_wer_and_exact_match_with_intervals(formula_run, tmp_path):
    out = tmp_path / "eval"
    result = eval_cli([formula_run, "--compare", "base,finetuned", "--control", "shuffled", "--out", out])
    assert result.exit_code == 0, result.output
    numbers = json.loads((out / "report.json").read_text())
    assert numbers["metric"] == "cer" and numbers["metrics"] == ["cer", "wer", "exact"]
    assert numbers["higher_is_better"] is False
    rows = read_jsonl(out / "predictions.jsonl")
    for name, entry in numbers["systems"].items():
        truth = [row["references"][0] for row in rows]
        said = [row["systems"][name]["answer"] for row in rows]
        assert entry["cer"]["value"] == pytest.approx(jiwer.cer(truth, [s.strip() for s in said]))
        assert entry["wer"]["value"] == pytest.approx(jiwer.wer(truth, [s.strip() for s in said]))
        assert entry["cer"]["low"] <= entry["cer"]["value"] <= entry["cer"]["high"]
        assert entry["cer"]["samples"] == entry["wer"]["samples"] == len(rows)
        assert entry["exact"]["right"] == sum(task_metrics.spacing(s) == task_metrics.spacing(t)
                                              for t, s in zip(truth, said, strict=True))
    pair = next(p for p in numbers["pairs"] if (p["baseline"], p["candidate"]) == ("base", "finetuned"))
    assert {"better", "worse", "ties", "change_low", "change_high", "sign_test_p"} <= set(pair["metrics"]["cer"])
    assert {"fixed", "broken", "mcnemar_p"} <= set(pair["metrics"]["exact"])
    text = (out / "report.md").read_text()
    assert "| system | CER | WER | exact match |" in text and "(lower is better)" in text


def write_rows(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_score_applies_anls_and_rouge_l(tmp_path):
    """ANLS on the Coca Cola example (0.89 and 1.0 of its table, mean 0.9444) and ROUGE-L on rouge-score's
    cases, as eval.py --score reports them."""
    rows = [{"id": "1", "prediction": "CocaCola", "answers": ["Coca Cola", "Coca Cola Company"], "qtype": "brand"},
            {"id": "2", "prediction": "Coca cola", "answers": ["Coca Cola", "Coca Cola Company"], "qtype": "brand"},
            {"id": "3", "prediction": "Cat", "answers": ["Coca Cola"], "qtype": "other"}]
    path = write_rows(tmp_path / "docs.jsonl", rows)
    assert eval_cli(["--score", path, "--metric", "anls", "--out", tmp_path / "anls"]).exit_code == 0
    numbers = json.loads((tmp_path / "anls" / "report.json").read_text())
    entry = numbers["systems"]["docs"]
    assert entry["anls"]["value"] == pytest.approx((8 / 9 + 1 + 0) / 3)
    assert entry["groups"]["qtype"]["brand"]["anls"]["value"] == pytest.approx((8 / 9 + 1) / 2)
    assert entry["exact"]["right"] == 1  # "Coca cola" only, case ignored
    path = write_rows(tmp_path / "free.jsonl", [{"prediction": "testing one", "answer": "testing one two"},
                                                {"prediction": "testing two", "answer": "testing one two"}])
    assert eval_cli(["--score", path, "--metric", "rougeL", "--out", tmp_path / "rouge"]).exit_code == 0
    numbers = json.loads((tmp_path / "rouge" / "report.json").read_text())
    assert numbers["systems"]["free"]["rougeL"]["value"] == pytest.approx(4 / 5)
    assert "text-overlap score" in (tmp_path / "rouge" / "report.md").read_text()


def test_grpo_reward_is_the_task_metric():
    said = [[{"role": "assistant", "content": "This test"}], [{"role": "assistant", "content": "This is a test"}]]
    assert relaxed_accuracy(said, [["This is a test"]] * 2, metric="cer") == pytest.approx([1 - 5 / 14, 1.0])
    assert relaxed_accuracy(said[:1], [["Coca Cola"]], metric="anls") == [0.0]
