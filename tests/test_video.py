"""Videos in rows (a file, or a list of frame files): decoded per batch through the processor's video path,
counted by the plan as the collator makes them, trained, linted, evaluated and asked about (infer.py --video).
The tests make their own small videos (tests/conftest.write_test_video); nothing is downloaded."""

import json

import pytest
from click.testing import CliRunner
from PIL import Image

from data.lint import lint
from tests.conftest import train_cli, write_test_video


@pytest.fixture()
def clips(tmp_path):
    """Two MPEG-4 files of 8 and 9 frames at 4 frames/s, and one video as a folder of 5 PNG frames."""
    (tmp_path / "vid").mkdir()
    write_test_video(tmp_path / "vid" / "a.mp4", frames_count=8)
    write_test_video(tmp_path / "vid" / "b.mp4", frames_count=9, size=(84, 112))
    (tmp_path / "frames").mkdir()
    for index in range(5):
        Image.new("RGB", (112, 84), (index * 40, 120, 200)).save(tmp_path / "frames" / f"{index}.png")
    return ["vid/a.mp4", "vid/b.mp4", [f"frames/{i}.png" for i in range(5)]]


def video_rows(clips):
    """LLaMA-Factory's mllm_video_demo.json shape: <video> where the clip goes, "videos" beside the messages."""
    answers = ["right", "up", "brighter"]
    return [{"messages": [{"role": "user", "content": "<video>Where does it move?"},
                          {"role": "assistant", "content": answer}], "videos": [clip]}
            for clip, answer in zip(clips, answers)]


@pytest.fixture(scope="module")
def processor():
    from transformers import AutoProcessor

    from kit.inputs.chat import set_pixels
    from kit.model import tiny_model_dir

    processor = AutoProcessor.from_pretrained(tiny_model_dir())
    set_pixels(processor, 3136, 19600)
    return processor


@pytest.mark.parametrize("fps, max_frames", [(2.0, 16), (4.0, 3), (1.0, 16)])
def test_plan_counts_the_video_tokens_the_collator_makes(tmp_path, clips, processor, fps, max_frames):
    import data
    from kit.inputs import video
    from kit.inputs.chat import IGNORE, VisionCollator
    from kit.plan import estimate

    video.set_sampling(processor, fps, max_frames)
    path = tmp_path / "videos.json"
    path.write_text(json.dumps(video_rows(clips), indent=2))
    samples = data.load({"dataset": f"jsonl:{path}", "dataset_split": "train", "limit": 0})
    assert lint(samples) == [] and [len(s["videos"]) for s in samples] == [1, 1, 1]
    findings, counts = estimate.preflight(samples, processor, {"system_prompt": "", "max_length": 1024, "fps": fps,
                                                            "max_frames": max_frames})
    assert findings == []
    batch = VisionCollator(processor, max_length=1024)(samples)
    pad = processor.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    for row, (vision, text) in enumerate(counts):
        ids = batch["input_ids"][row][batch["attention_mask"][row] == 1]
        assert int((ids == pad).sum()) == vision > 0
        assert len(ids) == vision + text
        assert (batch["labels"][row][batch["input_ids"][row] == pad] == IGNORE).all()
    # frames kept: 2 s at 4 frames/s, sampled at fps, capped at max_frames; a frame list keeps its frames (<= cap)
    expected = [min(round(8 / 4 * fps), max_frames), min(round(9 / 4 * fps), max_frames), min(5, max_frames)]
    grids = batch["video_grid_thw"].tolist()
    assert [t for t, _, _ in grids] == [-(-n // 2) for n in expected]  # two frames make one grid in time
    assert grids[0][1:] == [84 // 14, 112 // 14] and grids[1][1:] == [112 // 14, 84 // 14]


@pytest.mark.slow
def test_video_rows_train_lint_evaluate_and_answer(tmp_path, clips):
    import eval as evaluate
    import infer

    rows = video_rows(clips)
    (tmp_path / "dataset_info.json").write_text(json.dumps({"clips": {
        "file_name": "videos.json", "formatting": "sharegpt", "columns": {"messages": "messages", "videos": "videos"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}}}))
    (tmp_path / "videos.json").write_text(json.dumps(rows, indent=2))
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    from data.lint import main as lint_main

    linted = CliRunner().invoke(lint_main, [f"llamafactory:{tmp_path}#clips", "--recipe", "demo"])
    assert linted.exit_code == 0 and "3 rows checked, 0 problem(s)" in linted.output, linted.output
    result = train_cli(["--recipe", "demo", "--output", str(tmp_path / "run"), "--set",
                        f"dataset=llamafactory:{tmp_path}#clips", "--set", "max_steps=2", "--set", "logging_steps=1",
                        "--set", "per_device_train_batch_size=3", "--set", "fps=2", "--set", "max_frames=4",
                        "--set", "max_length=512"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "run" / "run_config.json").read_text())["recipe"]["max_frames"] == 4
    scored = CliRunner().invoke(evaluate.main, [str(tmp_path / "run"), "--data", f"jsonl:{tmp_path / 'test.jsonl'}",
                                                "--compare", "finetuned", "--out", str(tmp_path / "eval")],
                                catch_exceptions=False)
    assert scored.exit_code == 0, scored.output
    predictions = [json.loads(x) for x in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert [p["references"] for p in predictions] == [["right"], ["up"]]
    for given in (tmp_path / "vid" / "a.mp4", tmp_path / "frames"):
        answered = CliRunner().invoke(infer.main, [str(tmp_path / "run"), "--video", str(given), "--question",
                                                   "Where does it move?", "--max-new-tokens", "4"],
                                      catch_exceptions=False)
        assert answered.exit_code == 0, answered.output


def test_bad_videos_are_findings_with_file_and_line(tmp_path, clips):
    (tmp_path / "vid" / "broken.mp4").write_bytes(b"not a video at all")
    rows = video_rows(clips)
    rows[0]["videos"] = ["vid/missing.mp4"]
    rows[1]["videos"] = ["vid/broken.mp4"]
    rows[2]["messages"][0]["content"] = "Where does it move?"  # no <video> for its video
    path = tmp_path / "videos.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    from data.lint import main as lint_main

    result = CliRunner().invoke(lint_main, [f"jsonl:{path}", "--recipe", "demo"])
    assert result.exit_code == 1
    assert f"{path}:1: video file not found: {tmp_path / 'vid' / 'missing.mp4'}" in result.output
    assert f"{path}:2: video unreadable: {tmp_path / 'vid' / 'broken.mp4'}" in result.output
    assert f"{path}:3: 0 video placeholder(s) in the messages but 1 video(s)" in result.output


def test_infer_refuses_a_missing_video_in_one_line(tmp_path):
    import infer

    result = CliRunner().invoke(infer.main, ["tiny", "--video", str(tmp_path / "none.mp4"), "--question", "q"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1] == f"error: --video: video file not found: {tmp_path / 'none.mp4'}"
