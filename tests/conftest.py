"""Shared fixtures: short training runs on the tiny model, made once per test session."""

import json
import os
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# tests/with_unsloth/ is its own lane (make test-unsloth, in its own venv, unsloth imported on purpose); this lane
# never collects it, so it never imports unsloth.
collect_ignore = [] if os.environ.get("QWEN2VL_KIT_TEST_UNSLOTH_ON_CPU") == "1" else ["with_unsloth"]

# Small enough to run in seconds on two cores, big enough that the loss clearly falls.
QUICK = ["synthetic_num_train=240", "synthetic_num_test=40", "max_steps=60", "logging_steps=10",
         "save_steps=30", "warmup_steps=5"]


def train_cli(args):
    import train

    result = CliRunner().invoke(train.main, args, catch_exceptions=False)
    return result


def run_train(folder: Path, extra=()):
    args = ["--recipe", "demo", "--output", str(folder)]
    for item in [*QUICK, *extra]:
        args += ["--set", item]
    result = train_cli(args)
    assert result.exit_code == 0, result.output
    return folder


@pytest.fixture(scope="session")
def full_run(tmp_path_factory) -> Path:
    """The demo recipe (full fine-tuning of the tiny model), shortened."""
    return run_train(tmp_path_factory.mktemp("runs") / "full")


# QLoRA as every GPU recipe trains it: a LoRA adapter on the base loaded in NF4 (bitsandbytes' CPU kernels here)
QLORA = ["finetune=lora", "load_in_4bit=true", "lora_r=8", "lora_alpha=16", "learning_rate=5e-3"]


@pytest.fixture(scope="session")
def lora_run(tmp_path_factory) -> Path:
    """A LoRA adapter on the tiny model, as the GPU recipes make it: on a 4-bit base (QLoRA)."""
    return run_train(tmp_path_factory.mktemp("runs") / "lora", QLORA)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_test_video(path, frames_count: int = 8, size: tuple[int, int] = (112, 84), fps: int = 4):
    """A small MPEG-4 video of moving bars (the tests make their own; nothing is downloaded)."""
    import av
    import numpy as np

    width, height = size
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for index in range(frames_count):
            picture = np.full((height, width, 3), 255, dtype=np.uint8)
            left = (index * 7) % max(1, width - 14)
            picture[height // 3:, left:left + 14] = (40, 90, 200)
            for packet in stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
