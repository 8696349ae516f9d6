"""Crash safety: a run killed with SIGKILL at any phase of a checkpoint save (tests/kill_during_save.py) resumes from
its last complete checkpoint and ends bit-identical to an uninterrupted run; SIGTERM saves a checkpoint and stops."""

import json
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import QLORA, ROOT, read_jsonl

pytestmark = pytest.mark.slow

# Checkpoints at 5, 10, 15, 20 with only the newest kept, so that a save at 10 also removes checkpoint-5.
SETTINGS = ["synthetic_num_train=240", "max_steps=20", "logging_steps=5", "save_steps=5", "warmup_steps=2",
            "save_total_limit=1"]
KILLED_AT = 10


def sets(settings=SETTINGS):
    return [item for setting in settings for item in ("--set", setting)]


def train(*args, timeout=600):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def weights(folder):
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reference") / "run"
    result = train("--recipe", "demo", "--output", str(folder), *sets())
    assert result.returncode == 0, result.stdout + result.stderr
    return folder


# phase -> the checkpoint the resumed run must start from (None: the killed run's last save was its end)
RESUMES_FROM = {"writing": 5, "marking": 5, "rotating": KILLED_AT, "saved": KILLED_AT, "final": None}


@pytest.mark.parametrize("phase", list(RESUMES_FROM))
def test_kill_at_every_phase_of_a_save_then_resume_matches_an_uninterrupted_run(phase, reference, tmp_path):
    killed = tmp_path / "killed"
    process = subprocess.run([sys.executable, str(ROOT / "tests" / "kill_during_save.py"), phase, str(KILLED_AT),
                              "--recipe", "demo", "--output", str(killed), *sets()], cwd=ROOT, capture_output=True,
                             text=True, timeout=600)
    assert process.returncode == -signal.SIGKILL, process.stdout + process.stderr
    killed_at = time.time()
    assert not (killed / "model.safetensors").exists()  # it really died before its end
    markers = [p.parent.name for p in sorted((killed / "checkpoints").glob("checkpoint-*/complete.json"),
                                             key=lambda p: int(p.parent.name.split("-")[1]))]
    expected = RESUMES_FROM[phase]
    last = f"checkpoint-{expected or 20}"
    assert markers[-1] == last, markers  # the newest complete checkpoint survived the kill
    if phase == "rotating":  # killed between the marker and the removal of the older checkpoint
        assert markers == ["checkpoint-5", last]

    resumed = train("--resume", str(killed))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr

    rows = read_jsonl(killed / "metrics.jsonl")
    steps = [row["step"] for row in rows]
    assert steps == [row["step"] for row in read_jsonl(reference / "metrics.jsonl")]  # no repeats, same end
    # rows up to the checkpoint are the killed run's own, those after it were trained again after the kill
    kept = [row["step"] for row in rows if row["time"] < killed_at]
    assert kept == [step for step in steps if step <= (expected or 20)]
    assert [row.get("loss") for row in rows] == [row.get("loss") for row in read_jsonl(reference / "metrics.jsonl")]
    final, wanted = weights(killed), weights(reference)
    assert final.keys() == wanted.keys() and all(final[k].equal(wanted[k]) for k in wanted)  # bit-identical
    # nothing half-saved is left, and the rotation kept one checkpoint
    assert [p.name for p in (killed / "checkpoints").iterdir()] == ["checkpoint-20"]
    marker = json.loads((killed / "checkpoints" / "checkpoint-20" / "complete.json").read_text())
    assert marker == {"global_step": 20, "max_steps": 20}
    assert not (killed / ".final.tmp").exists()


def test_sigterm_saves_a_checkpoint_and_says_how_to_resume(tmp_path):
    run = tmp_path / "stopped"
    process = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--recipe", "demo", "--output", str(run),
                                *sets(["synthetic_num_train=240", "max_steps=200", "logging_steps=5",
                                       "save_steps=30"])],
                               cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    while not (run / "metrics.jsonl").exists() or len(read_jsonl(run / "metrics.jsonl")) < 3:
        assert process.poll() is None, "the run ended before it could be stopped"
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 2, output
    assert f"python train.py --resume {run}" in output  # the command the user needs
    checkpoint = max((run / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    marker = json.loads((checkpoint / "complete.json").read_text())
    assert 10 <= marker["global_step"] < 200 and checkpoint.name == f"checkpoint-{marker['global_step']}"
    assert read_jsonl(run / "metrics.jsonl")[-1]["step"] <= marker["global_step"]
    assert not (run / "model.safetensors").exists()


def test_lora_run_killed_after_its_last_checkpoint_saves_that_checkpoints_adapter(tmp_path):
    """The finished-run path for an adapter: --resume trains nothing and writes the checkpoint's adapter."""
    from safetensors.torch import load_file

    from tests.conftest import train_cli

    run = tmp_path / "lora"
    lora = ["finetune=lora", "lora_r=8", "lora_alpha=16", "synthetic_num_train=32", "max_steps=3", "save_steps=3",
            "logging_steps=1", "warmup_steps=0"]
    assert train_cli(["--recipe", "demo", "--output", str(run), *sets(lora)]).exit_code == 0
    wanted = load_file(run / "adapter_model.safetensors")
    for name in ("adapter_model.safetensors", "adapter_config.json"):  # as a kill before the final save leaves it
        (run / name).unlink()
    before = read_jsonl(run / "metrics.jsonl")
    result = train_cli(["--resume", str(run)])
    assert result.exit_code == 0, result.output
    assert read_jsonl(run / "metrics.jsonl") == before  # nothing trained again
    final = load_file(run / "adapter_model.safetensors")
    assert final.keys() == wanted.keys() and all(final[k].equal(wanted[k]) for k in wanted)


# The family matrix's tiny models (tests/test_families.py), each on its own chart grid
FAMILY_SETS = {"qwen2-vl": [], "qwen2.5-vl": [], **{name: ["synthetic_size=160", "max_pixels=25600"]
                                                    for name in ("qwen3-vl", "qwen3-vl-moe", "qwen3.5", "qwen3.5-moe")}}
ADAPTER_SETTINGS = ["synthetic_num_train=32", "max_steps=4", "logging_steps=1", "save_steps=2", "warmup_steps=1",
                    "save_total_limit=1"]


@pytest.mark.parametrize("family, four_bit", [("qwen2-vl", False), *[(name, True) for name in FAMILY_SETS]])
def test_lora_run_killed_after_a_checkpoint_resumes_from_it(family, four_bit, tmp_path):
    """An adapter run (QLoRA on every family; 16-bit LoRA on the demo's) killed with SIGKILL right after its
    checkpoint at step 2 resumes from that checkpoint and ends with the uninterrupted run's adapter."""
    import torch
    from safetensors.torch import load_file

    settings = [*QLORA, f"load_in_4bit={str(four_bit).lower()}", f"model_name_or_path=tiny:{family}",
                *ADAPTER_SETTINGS, *FAMILY_SETS[family]]
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    result = train("--recipe", "demo", "--output", str(reference), *sets(settings))
    assert result.returncode == 0, result.stdout + result.stderr
    process = subprocess.run([sys.executable, str(ROOT / "tests" / "kill_during_save.py"), "saved", "2",
                              "--recipe", "demo", "--output", str(killed), *sets(settings)], cwd=ROOT,
                             capture_output=True, text=True, timeout=600)
    assert process.returncode == -signal.SIGKILL, process.stdout + process.stderr
    assert not (killed / "adapter_model.safetensors").exists()
    resumed = train("--resume", str(killed))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming from" in resumed.stdout and "checkpoint-2" in resumed.stdout

    rows, wanted_rows = read_jsonl(killed / "metrics.jsonl"), read_jsonl(reference / "metrics.jsonl")
    assert [row["step"] for row in rows] == [row["step"] for row in wanted_rows] == [1, 2, 3, 4]
    assert [row["loss"] for row in rows[:2]] == [row["loss"] for row in wanted_rows[:2]]  # before the kill
    assert [row["loss"] for row in rows] == [row["loss"] for row in wanted_rows]
    final, wanted = load_file(killed / "adapter_model.safetensors"), load_file(reference / "adapter_model.safetensors")
    assert final.keys() == wanted.keys()
    assert all(final[k].dtype == torch.float32 for k in final)  # TRL cast a 4-bit base's adapter to bf16: undone
    assert all(final[k].equal(wanted[k]) for k in wanted)  # bit-identical
