import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.slow
def test_memory_sets_the_plan_beside_host_memory_for_both_bases(tmp_path):
    """bench.py --memory on the tiny model: one process per base (4-bit, 16-bit), each with the plan's parts and
    the measured ones, and a table that prints both."""
    out = tmp_path / "memory.json"
    done = subprocess.run(
        [sys.executable, "bench.py", "--recipe", "chartqa_2b", "--model", "tiny", "--backends", "hf", "--memory",
         "--steps", "1", "--warmup", "1", "--json", str(out), "--set", "per_device_train_batch_size=1",
         "--set", "gradient_accumulation_steps=1", "--set", "optim=adamw_torch", "--set", "max_pixels=50176",
         "--set", "dataloader_num_workers=0"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    results = {r["backend"]: r for r in json.loads(out.read_text())}
    assert set(results) == {"4-bit", "16-bit"} and all("error" not in r for r in results.values())
    assert results["4-bit"]["load_in_4bit"] and not results["16-bit"]["load_in_4bit"]
    for result in results.values():
        parts = ("base weights", "adapter + grads + optimizer", "activations + logits")
        assert all(result["plan"][part] > 0 for part in parts)
        assert result["host"]["total"] >= result["host"]["base weights"] > 0
    # the 4-bit base's planned weights are the smaller; the printed table names every part of both
    assert results["4-bit"]["plan"]["base weights"] < results["16-bit"]["plan"]["base weights"]
    for words in ("| 4-bit | base weights |", "| 16-bit | activations + logits |", "4-bit / 16-bit base weights",
                  "plan's weights + adapter + optimizer",
                  "Command: `python bench.py --recipe chartqa_2b --backends hf --memory"):  # a command that runs
        assert words in done.stdout, words
