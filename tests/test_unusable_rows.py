"""What a loader cannot use (audio, an <audio> marker, images by URL, content parts of other types) is a finding
with file:line, the same through jsonl: and llamafactory:, never dropped silently or left in the prompt as
markup; and duplicates are rows alike in all their media, videos included."""

import json

import pytest
from PIL import Image

import data
from data.lint import lint
from tests.conftest import write_test_video

# LLaMA-Factory's mllm_audio_demo.json rows, as shipped (the audio file need not exist: the row is refused first)
AUDIO_ROWS = [{"messages": [{"role": "user", "content": "<audio>What's that sound?"},
                            {"role": "assistant", "content": "It is the sound of glass shattering."}],
               "audios": ["mllm_demo_data/1.mp3"]},
              {"messages": [{"role": "user", "content": "<image>How many bars?"},
                            {"role": "assistant", "content": "3"}], "images": ["chart.png"]}]


@pytest.fixture()
def folder(tmp_path):
    Image.new("RGB", (56, 56), "white").save(tmp_path / "chart.png")
    return tmp_path


def load(spec: str):
    return data.load({"dataset": spec, "dataset_split": "train", "limit": 0})


def findings(samples) -> list[tuple[str, str]]:
    return [(where, problem) for _, where, problem in lint(samples)]


def test_audio_is_the_same_finding_through_jsonl_and_llamafactory(folder):
    path = folder / "mllm_audio_demo.json"
    path.write_text(json.dumps(AUDIO_ROWS, indent=2))
    (folder / "dataset_info.json").write_text(json.dumps({"mllm_audio_demo": {
        "file_name": "mllm_audio_demo.json", "formatting": "sharegpt",
        "columns": {"messages": "messages", "audios": "audios"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}}}))
    through_jsonl = findings(load(f"jsonl:{path}"))
    through_llamafactory = findings(load(f"llamafactory:{folder}#mllm_audio_demo"))
    assert through_jsonl == through_llamafactory, (through_jsonl, through_llamafactory)
    ((where, problem),) = through_jsonl  # the image row is fine
    assert where == f"{path}:2" and "audio" in problem and "--on-bad-row skip" in problem


@pytest.mark.parametrize("row, words", [
    # an <audio> marker without a file: never left in the prompt as text
    ({"messages": [{"role": "user", "content": "<audio>What is it?"}, {"role": "assistant", "content": "a bell"}]},
     ["<audio>", "not audio"]),
    # chat parts of a type the kit does not train: never dropped by the template without a word
    ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "AAAA"}},
                                                {"type": "text", "text": "What is it?"}]},
                   {"role": "assistant", "content": [{"type": "text", "text": "a bell"}]}]},
     ["input_audio", "text, image and video parts only"]),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x.org/c.png"}},
                                                {"type": "text", "text": "Highest bar?"}]},
                   {"role": "assistant", "content": [{"type": "text", "text": "B"}]}]},
     ["image_url", "download it"]),
    # images and videos by URL: kept as written and named, never resolved into a local path that is not there
    ({"image": "https://example.org/chart.png", "question": "Highest bar?", "answer": "B"},
     ["image by URL (https://example.org/chart.png)", "download it"]),
    ({"messages": [{"role": "user", "content": [{"type": "image", "url": "http://example.org/c.png"},
                                                {"type": "text", "text": "Highest bar?"}]},
                   {"role": "assistant", "content": [{"type": "text", "text": "B"}]}]},
     ["image by URL (http://example.org/c.png)"]),
    ({"messages": [{"role": "user", "content": "<video>Where does it go?"}, {"role": "assistant", "content": "up"}],
      "videos": ["https://example.org/clip.mp4"]},
     ["video by URL (https://example.org/clip.mp4)"]),
])
def test_what_the_kit_cannot_train_is_a_finding_with_its_line(folder, row, words):
    path = folder / "rows.jsonl"
    good = {"image": "chart.png", "question": "How many bars?", "answer": "3"}
    path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    found = findings(load(f"jsonl:{path}"))
    assert [where for where, _ in found] == [f"{path}:2"], found
    for word in words:
        assert word in found[0][1], (word, found[0][1])


def test_rows_that_differ_only_in_their_video_are_not_duplicates(folder):
    for name in ("a", "b"):
        write_test_video(folder / f"{name}.mp4", frames_count=4)
    rows = [{"messages": [{"role": "user", "content": "<video>Where does it move?"},
                          {"role": "assistant", "content": "right"}], "videos": [video]}
            for video in ("a.mp4", "b.mp4", "a.mp4")]
    path = folder / "videos.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    found = findings(load(f"jsonl:{path}"))
    # the third repeats the first; the second differs from it only in its video
    assert found == [(f"{path}:3", f"exact duplicate of {path}:1")], found


def test_an_audio_row_stops_training_and_writes_nothing(folder):
    from tests.conftest import train_cli

    path = folder / "mixed.json"
    path.write_text(json.dumps(AUDIO_ROWS, indent=2))
    args = ["--recipe", "demo", "--output", str(folder / "run"), "--set", f"dataset=jsonl:{path}",
            "--set", "eval_split=", "--set", "max_steps=1"]
    result = train_cli(args)
    assert result.exit_code == 2 and f"{path}:2" in result.output and "audio" in result.output, result.output
    assert not (folder / "run" / "model.safetensors").exists()
