"""One test per kind of bad row: lint names the file and line, train.py stops (fail) or leaves the row out
and lists it (skip), and nothing is half-written."""

import json
import shutil

import pytest
from PIL import Image

from data.jsonl import load as load_jsonl
from data.lint import lint
from data.synthetic import generate
from tests.conftest import read_jsonl, train_cli


@pytest.fixture()
def good_rows(tmp_path):
    charts = generate("train", 4, seed=3, question_types=["count"], grid=28, cache=tmp_path / "charts", progress=False)
    rows = []
    for index, sample in enumerate(charts):
        name = f"chart{index}.png"
        shutil.copy(sample["images"][0], tmp_path / name)
        rows.append({"image": name, "question": sample["messages"][0]["content"][1]["text"],
                     "answer": sample["answers"][0]})
    return rows


def write(tmp_path, rows, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def bad_image_file(tmp_path, kind):
    if kind == "truncated":
        data = (tmp_path / "chart0.png").read_bytes()
        (tmp_path / "broken.png").write_bytes(data[: len(data) // 2])
        return "broken.png"
    if kind == "wide":
        Image.new("RGB", (2010, 10), "white").save(tmp_path / "wide.png")
        return "wide.png"
    return "no_such_file.png"


BAD_ROWS = {
    "missing image": (lambda t, g: dict(g[0], image=bad_image_file(t, "missing")), "image file not found"),
    "truncated image": (lambda t, g: dict(g[0], image=bad_image_file(t, "truncated")), "unreadable or truncated"),
    "aspect ratio": (lambda t, g: dict(g[0], image=bad_image_file(t, "wide")), "aspect ratio"),
    "empty answer": (lambda t, g: dict(g[0], answer="  "), "empty or missing assistant answer"),
    "missing answer": (lambda t, g: {k: v for k, v in g[0].items() if k != "answer"},
                       "empty or missing assistant answer"),
    "unknown role": (lambda t, g: {"image": g[0]["image"], "messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "q"}]},
        {"role": "robot", "content": [{"type": "text", "text": "a"}]}]}, "unknown role 'robot'"),
    "placeholder count": (lambda t, g: {"images": [g[0]["image"], g[1]["image"]], "messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "q"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "a"}]}]}, "1 image placeholder(s)"),
    "duplicate": (lambda t, g: dict(g[1]), "exact duplicate of"),
    "not json": (lambda t, g: '{"image": "chart0.png", "question": ', "not valid JSON"),
}


@pytest.mark.parametrize("kind", BAD_ROWS)
def test_lint_names_file_line_and_problem(tmp_path, good_rows, kind):
    make, words = BAD_ROWS[kind]
    path = write(tmp_path, [*good_rows, make(tmp_path, good_rows)])
    findings = lint(load_jsonl(str(path)))
    bad_line = len(good_rows) + 1
    assert [(place, problem) for _, place, problem in findings if words in problem], findings
    assert all(place == f"{path}:{bad_line}" for _, place, problem in findings), findings


def test_zero_sized_image_in_memory_is_found():
    sample = {"images": [Image.new("RGB", (0, 4))], "messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "q"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "a"}]}], "id": "zero"}
    assert [problem for _, _, problem in lint([sample])] == ["image has zero size (0x4)"]


def test_clean_rows_have_no_findings(tmp_path, good_rows):
    assert lint(load_jsonl(str(write(tmp_path, good_rows)))) == []


def train_on(path, out, *extra):
    args = ["--recipe", "demo", "--output", str(out), "--set", f"dataset=jsonl:{path}", "--set", "max_steps=2",
            "--set", "logging_steps=1", *extra]
    return train_cli(args)


@pytest.mark.parametrize("kind", ["missing image", "unknown role", "not json"])
def test_train_fails_before_writing_anything(tmp_path, good_rows, kind):
    make, words = BAD_ROWS[kind]
    path = write(tmp_path, [*good_rows, make(tmp_path, good_rows)])
    result = train_on(path, tmp_path / "run")
    assert result.exit_code == 2
    assert f"{path}:{len(good_rows) + 1}" in result.output and words in result.output
    assert "--on-bad-row skip" in result.output
    assert not (tmp_path / "run").exists()


def test_train_skip_reports_and_lists_skipped_rows(tmp_path, good_rows):
    rows = [*good_rows, BAD_ROWS["missing image"][0](tmp_path, good_rows),
            BAD_ROWS["empty answer"][0](tmp_path, good_rows)]
    path = write(tmp_path, rows)
    result = train_on(path, tmp_path / "run", "--on-bad-row", "skip")
    assert result.exit_code == 0, result.output
    assert "skipping 2 bad row(s) of 6" in result.output
    skipped = read_jsonl(tmp_path / "run" / "skipped.jsonl")
    assert sorted(row["where"] for row in skipped) == [f"{path}:5", f"{path}:6"]
    assert json.loads((tmp_path / "run" / "run_config.json").read_text())["recipe"]["dataset"] == f"jsonl:{path}"


def test_too_long_sample_is_reported_with_its_counts(tmp_path, good_rows):
    path = write(tmp_path, good_rows)
    result = train_on(path, tmp_path / "run", "--set", "max_length=40")
    assert result.exit_code == 2
    assert f"{path}:1" in result.output and "> max_length 40" in result.output and "image" in result.output


def test_lint_command_lists_findings_and_exits_nonzero(tmp_path, good_rows):
    from click.testing import CliRunner

    from data.lint import main

    path = write(tmp_path, [*good_rows, BAD_ROWS["missing image"][0](tmp_path, good_rows)])
    result = CliRunner().invoke(main, [f"jsonl:{path}"])
    assert result.exit_code == 1
    assert f"{path}:5: image file not found" in result.output
    assert "5 rows checked, 1 problem(s)" in result.output
    clean = CliRunner().invoke(main, [f"jsonl:{write(tmp_path, good_rows, 'clean.jsonl')}"])
    assert clean.exit_code == 0 and "0 problem(s)" in clean.output
