"""eval.py on the shortened demo run: what it writes, and that the report says what the predictions say."""

import json
import shutil

import pytest
from click.testing import CliRunner
from tests.conftest import read_jsonl

import eval as evaluate
from kit.metrics import exact_correct, relaxed_correct


def eval_cli(args):
    return CliRunner().invoke(evaluate.main, [str(a) for a in args], catch_exceptions=False)


def read_table(report: str) -> dict[str, dict[str, str]]:
    """{system: {column: cell}} from the one markdown table in report.md."""
    lines = [line for line in report.splitlines() if line.startswith("|")]
    split = lambda line: [cell.strip() for cell in line.strip().strip("|").split("|")]  # noqa: E731
    header = split(lines[0])
    return {cells[0]: dict(zip(header, cells)) for cells in map(split, lines[2:])}


def percent(flags) -> str:
    return f"{100 * sum(flags) / len(flags):.1f}"


@pytest.fixture(scope="module")
def evaluated(full_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "eval"
    result = eval_cli([full_run, "--limit", 20, "--compare", "base,finetuned", "--control", "shuffled",
                       "--out", out])
    assert result.exit_code == 0, result.output
    return out, result.output


def test_one_prediction_row_per_sample_with_every_system(evaluated, full_run):
    out, _ = evaluated
    rows = read_jsonl(out / "predictions.jsonl")
    assert len(rows) == 20 and len({row["id"] for row in rows}) == 20
    systems = {"base", "base (shuffled)", "finetuned", "finetuned (shuffled)"}
    for row in rows:
        assert set(row["systems"]) == systems
        assert row["qtype"] in json.loads((full_run / "run_config.json").read_text())["recipe"][
            "synthetic_question_types"]
        assert row["shuffled_image"] != row["image"]  # the control really shows another chart
        for verdict in row["systems"].values():
            assert verdict["relaxed"] == relaxed_correct(verdict["answer"], row["references"])
            assert verdict["exact"] == exact_correct(verdict["answer"], row["references"])
    # every chart lends its image exactly once
    assert sorted(row["shuffled_image"] for row in rows) == sorted(row["image"] for row in rows)
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_numbers_are_recomputed_from_predictions(evaluated):
    out, output = evaluated
    rows = read_jsonl(out / "predictions.jsonl")
    table = read_table((out / "report.md").read_text())
    assert set(table) == set(rows[0]["systems"])
    qtypes = sorted({row["qtype"] for row in rows})
    for system, cells in table.items():
        assert cells["relaxed acc"] == percent([row["systems"][system]["relaxed"] for row in rows])
        assert cells["exact match"] == percent([row["systems"][system]["exact"] for row in rows])
        for qtype in qtypes:
            flags = [row["systems"][system]["relaxed"] for row in rows if row["qtype"] == qtype]
            assert cells[f"qtype={qtype}"] == percent(flags)
        assert cells["samples"] == str(len(rows))
        assert float(cells["s/sample"]) > 0
    assert "| finetuned (shuffled) |" in output  # the table is printed at the end too


def test_existing_eval_folder_needs_force(evaluated, full_run):
    out, _ = evaluated
    before = (out / "predictions.jsonl").read_text()
    result = eval_cli([full_run, "--out", out, "--compare", "finetuned"])
    assert result.exit_code == 2 and "--force" in result.output
    assert (out / "predictions.jsonl").read_text() == before


@pytest.fixture
def questions_with_missing_image(full_run, tmp_path):
    """Three questions on two real charts; the second row names an image that is not there."""
    import data

    recipe = json.loads((full_run / "run_config.json").read_text())["recipe"]
    charts = data.load({**recipe, "limit": 2}, "test", progress=False)
    (tmp_path / "charts").mkdir()
    for i, sample in enumerate(charts):
        shutil.copy(sample["images"][0], tmp_path / "charts" / f"{i}.png")
    rows = [{"image": "charts/0.png", "question": "How many bars are in the chart?", "answer": "3"},
            {"image": "charts/missing.png", "question": "How many bars are in the chart?", "answer": "4"},
            {"image": "charts/1.png", "question": "Which label has the highest value?", "answer": "B"}]
    path = tmp_path / "questions.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_missing_image_fails_naming_the_row(full_run, questions_with_missing_image, tmp_path):
    result = eval_cli([full_run, "--data", f"jsonl:{questions_with_missing_image}", "--compare", "finetuned",
                       "--out", tmp_path / "eval"])
    assert result.exit_code == 2
    assert f"{questions_with_missing_image}:2" in result.output and "missing.png" in result.output
    assert not (tmp_path / "eval").exists()


def test_missing_image_skipped_on_request(full_run, questions_with_missing_image, tmp_path):
    out = tmp_path / "eval"
    result = eval_cli([full_run, "--data", f"jsonl:{questions_with_missing_image}", "--compare", "finetuned",
                       "--on-bad-row", "skip", "--out", out])
    assert result.exit_code == 0, result.output
    scored = read_jsonl(out / "predictions.jsonl")
    skipped = read_jsonl(out / "skipped.jsonl")
    assert [row["image"].rsplit("/", 1)[-1] for row in scored] == ["0.png", "1.png"]
    assert [row["where"] for row in skipped] == [f"{questions_with_missing_image}:2"]
    assert "missing.png" in skipped[0]["problem"]
    assert read_table((out / "report.md").read_text())["finetuned"]["samples"] == "2"


def test_report_splits_chartqa_subsets():
    rows = [{"subset": subset, "systems": {"finetuned": {"relaxed": relaxed, "exact": False}}}
            for subset, relaxed in [("human", True), ("human", False), ("augmented", True), ("augmented", True)]]
    table = read_table(evaluate.report_table(rows, ["finetuned"], {"finetuned": 0.5}))
    human = [row["systems"]["finetuned"]["relaxed"] for row in rows if row["subset"] == "human"]
    augmented = [row["systems"]["finetuned"]["relaxed"] for row in rows if row["subset"] == "augmented"]
    assert table["finetuned"]["subset=human"] == percent(human)
    assert table["finetuned"]["subset=augmented"] == percent(augmented)
    assert table["finetuned"]["relaxed acc"] == percent([row["systems"]["finetuned"]["relaxed"] for row in rows])
