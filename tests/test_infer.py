"""infer.py on the shortened demo run (transformers) and on a GGUF of it (llama.cpp)."""

import json
import shutil

import pytest
from click.testing import CliRunner

import infer
from tests.conftest import read_jsonl


def infer_cli(args):
    return CliRunner().invoke(infer.main, [str(a) for a in args], catch_exceptions=False)


def last_line(output: str) -> str:
    return output.strip().splitlines()[-1].strip()


@pytest.fixture(scope="module")
def questions(full_run, tmp_path_factory):
    """A batch file of held-out synthetic questions with their reference answers, images relative to the file,
    the two question kinds mixed."""
    import data

    recipe = json.loads((full_run / "run_config.json").read_text())["recipe"]
    folder = tmp_path_factory.mktemp("questions")
    (folder / "charts").mkdir()
    rows = []
    for i, sample in enumerate(data.load({**recipe, "limit": 7}, "test", progress=False)):
        shutil.copy(sample["images"][0], folder / "charts" / f"{i}.png")
        question = sample["messages"][0]["content"][-1]["text"]
        rows.append({"image": f"charts/{i}.png", "question": question, "id": sample["id"],
                     "answer": sample["answers"][0]})
    path = folder / "questions.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def batch_answers(full_run, questions):
    """Answers with 3 charts a generate call (7 rows: a short last batch), and one chart at a time."""
    answers = {}
    for batch_size in (3, 1):
        result = infer_cli([full_run, "--batch", questions, "--batch-size", batch_size, "--force"])
        assert result.exit_code == 0, result.output
        answers[batch_size] = read_jsonl(questions.with_suffix(".answers.jsonl"))
    return answers


def test_batch_writes_one_answer_per_row(questions, batch_answers):
    rows, answered = read_jsonl(questions), batch_answers[3]
    # each row as it was (its reference "answer" included) plus the model's "prediction"
    assert [{k: v for k, v in row.items() if k != "prediction"} for row in answered] == rows
    assert all(row["prediction"] for row in answered)


def test_batched_answers_equal_one_by_one(batch_answers):
    assert [row["prediction"] for row in batch_answers[3]] == [row["prediction"] for row in batch_answers[1]]


def test_batch_reads_training_rows_and_feeds_eval_score(full_run, questions, batch_answers, tmp_path):
    """The same questions in training's {"images", "messages"} shape (the answer as the assistant turn, which is
    not shown to the model) get the same predictions, and eval.py --score scores the answers file as written."""
    import eval as evaluate
    from kit.evaluate.scoring import relaxed_correct

    shutil.copytree(questions.parent / "charts", tmp_path / "charts")
    rows = [{"id": row["id"], "images": [row["image"]], "messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": row["question"]}]},
        {"role": "assistant", "content": [{"type": "text", "text": row["answer"]}]}]} for row in read_jsonl(questions)]
    batch = tmp_path / "train-shaped.jsonl"
    batch.write_text("".join(json.dumps(row) + "\n" for row in rows))
    result = infer_cli([full_run, "--batch", batch, "--batch-size", 3])
    assert result.exit_code == 0, result.output
    answered = read_jsonl(batch.with_suffix(".answers.jsonl"))
    assert [row["prediction"] for row in answered] == [row["prediction"] for row in batch_answers[3]]
    assert [{k: v for k, v in row.items() if k != "prediction"} for row in answered] == rows

    result = CliRunner().invoke(evaluate.main, ["--score", str(batch.with_suffix(".answers.jsonl")),
                                                "--score", str(questions.with_suffix(".answers.jsonl")),
                                                "--out", str(tmp_path / "scored")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    scored = read_jsonl(tmp_path / "scored" / "predictions.jsonl")
    assert len(scored) == len(rows)  # both files' rows paired on "id": one question each
    for row, reference in zip(scored, read_jsonl(questions)):
        assert set(row["systems"]) == {"train-shaped.answers", "questions.answers"}
        for verdict in row["systems"].values():
            assert verdict["relaxed"] == relaxed_correct(verdict["answer"], [reference["answer"]])
    pair = json.loads((tmp_path / "scored" / "report.json").read_text())["pairs"][0]
    assert pair["fixed"] == pair["broken"] == 0 and pair["mcnemar_p"] == 1.0  # the same answers


def test_batch_row_with_wrong_image_count_is_named(full_run, questions, tmp_path):
    shutil.copytree(questions.parent / "charts", tmp_path / "charts")
    batch = tmp_path / "two.jsonl"
    batch.write_text(json.dumps({"images": ["charts/0.png", "charts/1.png"], "messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many bars?"}]}]}) + "\n")
    result = infer_cli([full_run, "--batch", batch])
    assert result.exit_code == 2 and f"{batch}:1" in result.output and "1 placeholders for 2 images" in result.output


def test_answers_a_chart(full_run, questions, batch_answers):
    row = batch_answers[3][0]
    result = infer_cli([full_run, "--image", questions.parent / row["image"], "--question", row["question"]])
    assert result.exit_code == 0, result.output
    assert last_line(result.stdout) == row["prediction"]


def test_existing_answers_file_needs_force(full_run, questions, batch_answers):
    result = infer_cli([full_run, "--batch", questions])
    assert result.exit_code == 2 and "--force" in result.output


def test_missing_or_unreadable_image_is_named(full_run, tmp_path):
    result = infer_cli([full_run, "--image", tmp_path / "nowhere.png", "--question", "How many bars?"])
    assert result.exit_code == 2 and "nowhere.png" in result.output
    (tmp_path / "notes.png").write_text("not an image")
    result = infer_cli([full_run, "--image", tmp_path / "notes.png", "--question", "How many bars?"])
    assert result.exit_code == 2 and "notes.png" in result.output
    batch = tmp_path / "batch.jsonl"
    batch.write_text(json.dumps({"image": "gone.png", "question": "How many bars?"}) + "\n")
    result = infer_cli([full_run, "--batch", batch])
    assert result.exit_code == 2 and f"{batch}:1" in result.output and "gone.png" in result.output


def test_missing_target_is_named(tmp_path):
    from PIL import Image

    Image.new("RGB", (56, 56), "white").save(tmp_path / "x.png")  # a real chart file: the target is what is missing
    result = infer_cli([tmp_path / "no-run", "--image", tmp_path / "x.png", "--question", "?"])
    assert result.exit_code == 2 and str(tmp_path / "no-run") in result.output.strip().splitlines()[-1]


# --- GGUF ----------------------------------------------------------------------------------------------------
# The GGUF pair as the kit writes it: merge.py with llama.cpp's own converter (no verification here: that is
# test_merge's job; this checks that infer.py answers from the files like the transformers model does).
@pytest.fixture(scope="module")
def gguf_dir(full_run, tmp_path_factory):
    import merge
    from kit.export.converter import find_converter

    out = tmp_path_factory.mktemp("export")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LLAMA_CPP_DIR", str(find_converter().parent))
        result = CliRunner().invoke(merge.main, [str(full_run), "--to", "gguf", "--quant", "f32", "--no-verify",
                                                 "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out / "gguf"


@pytest.mark.slow
def test_gguf_answers_like_the_transformers_model(gguf_dir, questions, batch_answers, tmp_path):
    batch = tmp_path / "questions.jsonl"
    shutil.copy(questions, batch)
    shutil.copytree(questions.parent / "charts", tmp_path / "charts")
    result = infer_cli([gguf_dir, "--batch", batch])
    assert result.exit_code == 0, result.output
    from_gguf = [row["prediction"] for row in read_jsonl(batch.with_suffix(".answers.jsonl"))]
    from_hf = [row["prediction"] for row in batch_answers[1]]
    # f32 weights and the same chat text and image size: greedy decoding picks the same tokens
    assert from_gguf == from_hf

    first = read_jsonl(batch)[0]
    result = infer_cli([gguf_dir / "full-f32.gguf", "--image", tmp_path / first["image"], "--question",
                        first["question"], "--stream"])
    assert result.exit_code == 0, result.output
    assert last_line(result.stdout) == from_gguf[0]


@pytest.mark.slow
def test_gguf_folder_without_projector_is_an_error(gguf_dir, questions, tmp_path):
    shutil.copy(gguf_dir / "full-f32.gguf", tmp_path)
    row = read_jsonl(questions)[0]
    result = infer_cli([tmp_path, "--image", questions.parent / row["image"], "--question", row["question"]])
    assert result.exit_code == 2 and "--mmproj" in result.output
