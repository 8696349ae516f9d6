"""eval.py on the shortened demo run: what it writes, and that the report says what the predictions say;
eval.py --score on prediction files written by hand (no model)."""

import json
import shutil

import pytest
from click.testing import CliRunner

import eval as evaluate
from kit.evaluate import report
from kit.evaluate.scoring import bootstrap_interval, exact_correct, mcnemar_exact, paired_counts, relaxed_correct
from tests.conftest import read_jsonl


def eval_cli(args):
    return CliRunner().invoke(evaluate.main, [str(a) for a in args], catch_exceptions=False)


def read_table(text: str, which: int = 0) -> dict[str, dict[str, str]]:
    """{first cell: {column: cell}} from the `which`-th markdown table in report.md."""
    tables, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append(current)
            current = []
    lines = tables[which]
    split = lambda line: [cell.strip() for cell in line.strip().strip("|").split("|")]  # noqa: E731
    header = split(lines[0])
    return {cells[0]: dict(zip(header, cells)) for cells in map(split, lines[2:])}


def percent(flags) -> str:
    return f"{100 * sum(flags) / len(flags):.1f}"


def with_interval(flags) -> str:
    """The report's cell: accuracy and its bootstrap interval, recomputed here from the flags."""
    low, high = bootstrap_interval(flags)
    return f"{percent(flags)} [{100 * low:.1f}, {100 * high:.1f}]"


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
    text = (out / "report.md").read_text()
    assert "ChartQA's reference rule (pix2struct relaxed_correctness" in text  # which rule made the columns
    table = read_table(text)
    assert set(table) == set(rows[0]["systems"])
    qtypes = sorted({row["qtype"] for row in rows})
    numbers = json.loads((out / "report.json").read_text())
    assert numbers["metric"] == "relaxed_accuracy" and numbers["relaxed_rule"] == "chartqa"
    assert numbers["interval"]["resamples"] == 2000
    for system, cells in table.items():
        relaxed = [row["systems"][system]["relaxed"] for row in rows]
        exact = [row["systems"][system]["exact"] for row in rows]
        assert cells["relaxed acc (chartqa)"] == with_interval(relaxed)
        assert cells["exact match"] == with_interval(exact)
        assert numbers["systems"][system]["relaxed"]["accuracy"] == sum(relaxed) / len(rows)
        assert numbers["systems"][system]["exact"]["right"] == sum(exact)
        for qtype in qtypes:
            flags = [row["systems"][system]["relaxed"] for row in rows if row["qtype"] == qtype]
            assert cells[f"qtype={qtype} (chartqa)"] == with_interval(flags)
            assert numbers["systems"][system]["groups"]["qtype"][qtype]["samples"] == len(flags)
        assert cells["samples"] == str(len(rows))
        assert float(cells["s/sample"]) > 0
    assert "| finetuned (shuffled) |" in output  # the table is printed at the end too


def test_paired_comparisons_and_diff(evaluated):
    """Fine-tuned against its shuffled-image control and against base: counts, McNemar's p, and the questions."""
    out, _ = evaluated
    rows = read_jsonl(out / "predictions.jsonl")
    pairs = read_table((out / "report.md").read_text(), which=1)
    numbers = {(p["baseline"], p["candidate"]): p for p in json.loads((out / "report.json").read_text())["pairs"]}
    changed = read_jsonl(out / "diff.jsonl")
    page = (out / "diff.html").read_text()
    for baseline, candidate in [("finetuned (shuffled)", "finetuned"), ("base", "finetuned")]:
        before = [row["systems"][baseline]["relaxed"] for row in rows]
        after = [row["systems"][candidate]["relaxed"] for row in rows]
        counts = paired_counts(before, after)
        assert {k: numbers[baseline, candidate][k] for k in counts} == counts
        assert numbers[baseline, candidate]["mcnemar_p"] == mcnemar_exact(counts["fixed"], counts["broken"])
        row = [cells for cells in pairs.values() if cells["candidate"] == candidate and cells["baseline"] == baseline]
        assert row and row[0]["fixed"] == str(counts["fixed"]) and row[0]["broken"] == str(counts["broken"])
        listed = [d for d in changed if (d["baseline"], d["candidate"]) == (baseline, candidate)]
        assert sorted(d["id"] for d in listed if d["change"] == "fixed") == \
            sorted(r["id"] for r, b, a in zip(rows, before, after) if a and not b)
        assert sorted(d["id"] for d in listed if d["change"] == "broken") == \
            sorted(r["id"] for r, b, a in zip(rows, before, after) if b and not a)
        assert f"{candidate} vs {baseline}: <span class=fixed>fixed</span> ({counts['fixed']})" in page
    # every listed question shows its chart: one thumbnail file per chart, each a PNG
    thumbs = sorted((out / "thumbs").glob("*.png"))
    assert len(thumbs) == len({d["id"] for d in changed}) > 0
    assert all(f"src='thumbs/{t.name}'" in page for t in thumbs)


def test_rescoring_predictions_gives_the_same_report(evaluated, tmp_path):
    out, _ = evaluated
    result = eval_cli(["--score", out / "predictions.jsonl", "--out", tmp_path / "again"])
    assert result.exit_code == 0, result.output
    first, again = (json.loads((folder / "report.json").read_text()) for folder in (out, tmp_path / "again"))
    for system, entry in first["systems"].items():
        entry.pop("seconds_per_sample")
        assert again["systems"][system] == entry
    assert again["pairs"] == first["pairs"]


def test_existing_eval_folder_needs_force(evaluated, full_run):
    out, _ = evaluated
    before = (out / "predictions.jsonl").read_text()
    result = eval_cli([full_run, "--out", out, "--compare", "finetuned"])
    assert result.exit_code == 2 and "--force" in result.output
    assert (out / "predictions.jsonl").read_text() == before


def test_out_holding_the_run_is_refused(full_run):
    # --force replaces the output folder: one that holds the run itself would take the run with it
    result = eval_cli([full_run, "--out", full_run.parent, "--force", "--compare", "finetuned"])
    assert result.exit_code == 2 and "choose another --out" in result.output
    assert (full_run / "run_config.json").exists()


def test_question_types_ask_other_synthetic_questions(full_run, tmp_path):
    """--question-types: the test charts ask the chosen types (what make demo-qlora scores the base's own skills
    with); an unknown type or non-synthetic data is one line."""
    out = tmp_path / "eval-last"
    result = eval_cli([full_run, "--question-types", "last", "--limit", 6, "--compare", "finetuned", "--out", out])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and {row["qtype"] for row in rows} == {"last"}
    assert all(row["question"].endswith("What is the label of the last bar?") for row in rows)
    for extra in (["--question-types", "lowest"], ["--question-types", "count", "--data", "chartqa"]):
        result = eval_cli([full_run, *extra, "--compare", "finetuned", "--out", tmp_path / "x"])
        assert result.exit_code == 2 and "--question-types" in result.output, result.output


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
    table = read_table(report.table(report.summarize(rows, ["finetuned"], "relaxed_accuracy", {"finetuned": 0.5})))
    human = [row["systems"]["finetuned"]["relaxed"] for row in rows if row["subset"] == "human"]
    augmented = [row["systems"]["finetuned"]["relaxed"] for row in rows if row["subset"] == "augmented"]
    assert table["finetuned"]["subset=human (chartqa)"] == with_interval(human)
    assert table["finetuned"]["subset=augmented (chartqa)"] == with_interval(augmented)
    assert table["finetuned"]["relaxed acc (chartqa)"] == \
        with_interval([row["systems"]["finetuned"]["relaxed"] for row in rows])


# --- eval.py --score: answers written by another tool, no model -------------------------------------------------
# pix2struct's metrics_test.py pairs (prediction, targets); tests/test_metrics.py works out each verdict by hand.
PIX2STRUCT = [("abc", ["abc"]), ("abc", ["Abc"]), ("Abc", ["abc"]), ("100%", ["96%"]), ("100%", ["94%"]),
              ("100%", ["0.96"]), ("100%", ["0.94"]), ("Don't", ["Won't"])]


def write_rows(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_score_a_predictions_file(tmp_path):
    answers = write_rows(tmp_path / "answers.jsonl", [
        {"prediction": p, "answers": t} if i % 2 else {"prediction": p, "answer": t[0]}
        for i, (p, t) in enumerate(PIX2STRUCT)])
    result = eval_cli(["--score", answers])
    assert result.exit_code == 0, result.output
    out = tmp_path / "answers-eval"  # the default: beside the file
    numbers = json.loads((out / "report.json").read_text())
    assert list(numbers["systems"]) == ["answers"]  # rows without "system" are named after their file
    entry = numbers["systems"]["answers"]
    assert entry["samples"] == 8 and entry["relaxed"]["accuracy"] == 0.625  # pix2struct's own figure
    assert entry["exact"]["right"] == 3  # the three "abc"s, case ignored
    assert read_table((out / "report.md").read_text())["answers"]["relaxed acc (chartqa)"].startswith("62.5 [")

    result = eval_cli(["--score", answers, "--relaxed-rule", "lenient", "--out", tmp_path / "lenient"])
    assert result.exit_code == 0, result.output
    lenient = json.loads((tmp_path / "lenient" / "report.json").read_text())
    assert lenient["systems"]["answers"]["relaxed"]["accuracy"] == 0.5  # "100%" read as 100 misses "0.96"
    assert "kit's lenient rule" in (tmp_path / "lenient" / "report.md").read_text()


def test_score_compares_systems_on_the_same_questions(tmp_path):
    """Two systems in one file and a third in another, matched by id; 12 questions, the candidate fixes 10
    and breaks 1 against base."""
    from PIL import Image

    Image.new("RGB", (40, 30), "white").save(tmp_path / "chart.png")
    base = [False] * 11 + [True]
    tuned = [True] * 10 + [False, False]
    rows = []
    for i, (b, t) in enumerate(zip(base, tuned)):
        question = {"id": f"q{i}", "image": "chart.png", "question": f"Value of {i}?", "answer": str(10 + i),
                    "qtype": "value" if i % 3 else "count"}
        rows.append({**question, "system": "base", "prediction": str(10 + i) if b else "no idea"})
        rows.append({**question, "system": "tuned", "prediction": f"{10 + i}\n" if t else "0"})
    both = write_rows(tmp_path / "both.jsonl", rows)
    other = write_rows(tmp_path / "other.jsonl", [{"id": f"q{i}", "answer": str(10 + i), "prediction": str(10 + i)}
                                                  for i in range(0, 12, 2)])  # half the questions
    out = tmp_path / "report"
    result = eval_cli(["--score", both, "--score", other, "--out", out])
    assert result.exit_code == 0, result.output
    numbers = json.loads((out / "report.json").read_text())
    assert [numbers["systems"][name]["samples"] for name in ("base", "tuned", "other")] == [12, 12, 6]
    pairs = {(p["baseline"], p["candidate"]): p for p in numbers["pairs"]}
    assert set(pairs) == {("base", "tuned"), ("base", "other"), ("tuned", "other")}
    tuned_vs_base = pairs["base", "tuned"]
    # q0-q9: base wrong, tuned right; q10: both wrong; q11: base right, tuned wrong
    assert (tuned_vs_base["fixed"], tuned_vs_base["broken"], tuned_vs_base["both_right"],
            tuned_vs_base["both_wrong"]) == (10, 1, 0, 1)
    assert tuned_vs_base["mcnemar_p"] == mcnemar_exact(10, 1) == 2 * (1 + 11) / 2 ** 11
    assert pairs["base", "other"]["samples"] == 6
    changed = read_jsonl(out / "diff.jsonl")
    assert sorted(d["id"] for d in changed if d["candidate"] == "tuned" and d["change"] == "broken") == ["q11"]
    assert "tuned vs base: <span class=fixed>fixed</span> (10)" in (out / "diff.html").read_text()
    assert (out / "thumbs" / "00000.png").exists()  # the chart, found relative to the scored file
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_score_bad_input_is_named(tmp_path):
    bad = write_rows(tmp_path / "bad.jsonl", [{"prediction": "1", "answer": "1"}, {"answer": "2"}])
    result = eval_cli(["--score", bad, "--out", tmp_path / "out"])
    assert result.exit_code == 2 and f"{bad}:2" in result.output and "prediction" in result.output
    assert not (tmp_path / "out").exists()
    good = write_rows(tmp_path / "good.jsonl", [{"prediction": "1", "answer": "1"}])
    result = eval_cli(["--score", good, "--out", tmp_path])  # would replace the folder holding the file
    assert result.exit_code == 2 and "choose another --out" in result.output and good.exists()
    assert eval_cli(["--score", good, "--out", tmp_path / "out"]).exit_code == 0
    before = (tmp_path / "out" / "report.json").read_text()
    result = eval_cli(["--score", good, "--out", tmp_path / "out"])
    assert result.exit_code == 2 and "--force" in result.output
    assert (tmp_path / "out" / "report.json").read_text() == before
    result = eval_cli([])
    assert result.exit_code == 2 and "--score" in result.output


def test_exported_systems_come_from_export_json_or_one_line_naming_the_fix(tmp_path):
    """--compare merged / gguf / gguf:QUANT: found through RUN/export.json, each file checked; what is missing is one
    line with the merge.py command that writes it."""
    from kit.errors import UserError
    from kit.evaluate import exported

    run = tmp_path / "run"
    run.mkdir()
    assert exported.choose("base,finetuned", ("base", "finetuned"), run, "run") == (["base", "finetuned"], {})
    with pytest.raises(UserError, match="export.json does not exist.*merge.py"):
        exported.choose("finetuned,merged", ("finetuned",), run, "run")
    (tmp_path / "gguf").mkdir()
    (tmp_path / "gguf" / "run-f16.gguf").write_bytes(b"")
    (tmp_path / "merged").mkdir()
    (run / "export.json").write_text(json.dumps({
        "outputs": {"merged": str(tmp_path / "merged"), "gguf": str(tmp_path / "gguf")},
        "gguf": {"models": {"f16": "run-f16.gguf"}}}))
    systems, deployed = exported.choose("finetuned,merged,gguf", ("finetuned",), run, "run")
    assert systems == ["finetuned"]
    assert deployed == {"merged": tmp_path / "merged", "gguf:f16": tmp_path / "gguf" / "run-f16.gguf"}
    with pytest.raises(UserError, match="has GGUF f16; write q4_k_m with python merge.py .* --quant f16,q4_k_m"):
        exported.choose("gguf:q4_k_m", ("finetuned",), run, "run")
    with pytest.raises(UserError, match="choose from finetuned, merged, gguf"):
        exported.choose("finetuned,mergd", ("finetuned",), run, "run")
    with pytest.raises(UserError, match="give the run folder"):
        exported.choose("merged", ("finetuned",), None, "gguf")
    (tmp_path / "gguf" / "run-f16.gguf").unlink()
    with pytest.raises(UserError, match="run-f16.gguf .* is gone"):
        exported.choose("gguf", ("finetuned",), run, "run")


def test_score_labels_name_two_runs_systems_and_pairs_go_by_type(tmp_path):
    """Two runs' predictions.jsonl both call their system `finetuned`: LABEL=FILE tells them apart, and the
    pair is also compared within each qtype."""
    def predictions(name, right):
        (tmp_path / name).mkdir()
        return write_rows(tmp_path / name / "predictions.jsonl", [
            {"id": f"q{i}", "question": "?", "references": ["4"], "qtype": "count" if i < 4 else "max",
             "systems": {"finetuned": {"answer": "4" if ok else "9", "relaxed": ok, "exact": ok}}}
            for i, ok in enumerate(right)])

    sft = predictions("sft", [True, True, True, True, False, False, False, False])
    grpo = predictions("grpo", [True, True, True, False, True, True, True, False])
    out = tmp_path / "vs"
    result = eval_cli(["--score", f"sft={sft}", "--score", f"grpo={grpo}", "--out", out])
    assert result.exit_code == 0, result.output
    numbers = json.loads((out / "report.json").read_text())
    assert list(numbers["systems"]) == ["sft", "grpo"]
    pair = numbers["pairs"][0]
    assert (pair["baseline"], pair["candidate"], pair["fixed"], pair["broken"]) == ("sft", "grpo", 3, 1)
    by_type = pair["groups"]["qtype"]
    assert (by_type["count"]["fixed"], by_type["count"]["broken"]) == (0, 1)
    assert (by_type["max"]["fixed"], by_type["max"]["broken"], by_type["max"]["samples"]) == (3, 0, 4)
    assert by_type["max"]["mcnemar_p"] == mcnemar_exact(3, 0)
    per_type = read_table((out / "report.md").read_text(), which=-1)  # the last table: by question type
    assert per_type["qtype=max"]["fixed"] == "3" and per_type["qtype=count"]["broken"] == "1"
    assert "qtype=max | sft | grpo" in result.output  # printed too
    # without labels both files name the same system: one clear line, exit 2
    assert eval_cli(["--score", sft, "--score", grpo, "--out", tmp_path / "clash"]).exit_code == 2
