"""Crash safety: a run killed with SIGKILL after a checkpoint resumes with the same data order and ends on
the same step, its loss curve continuing from the checkpoint rather than from step 0."""

import os
import signal
import subprocess
import sys
import time

from tests.conftest import ROOT, read_jsonl

SETTINGS = ["synthetic_num_train=240", "max_steps=200", "logging_steps=10", "save_steps=30", "warmup_steps=5"]


def command(*args):
    sets = [item for setting in SETTINGS for item in ("--set", setting)]
    return [sys.executable, str(ROOT / "train.py"), *args, *sets]


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path):
    reference = tmp_path / "reference"
    subprocess.run(command("--recipe", "demo", "--output", str(reference)), check=True, capture_output=True,
                   cwd=ROOT, timeout=600)

    killed = tmp_path / "killed"
    process = subprocess.Popen(command("--recipe", "demo", "--output", str(killed)), cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "checkpoint-30" / "trainer_state.json").exists():
        assert process.poll() is None and time.time() < deadline, "no checkpoint before the run ended"
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (killed / "model.safetensors").exists()  # it really died mid-run

    resumed = subprocess.run([sys.executable, str(ROOT / "train.py"), "--resume", str(killed)], cwd=ROOT,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming from" in resumed.stdout

    rows = read_jsonl(killed / "metrics.jsonl")
    steps = [row["step"] for row in rows]
    assert steps == sorted(set(steps)) and steps[-1] == 200  # no repeats, same final step
    reference_loss = {row["step"]: row["loss"] for row in read_jsonl(reference / "metrics.jsonl")}
    for row in rows:
        if row["step"] > 30:  # trained after the resume: same batches, same loss
            assert abs(row["loss"] - reference_loss[row["step"]]) <= 1e-3 * reference_loss[row["step"]], row
    assert (killed / "model.safetensors").exists()


def test_sigterm_saves_a_checkpoint_and_says_how_to_resume(tmp_path):
    run = tmp_path / "stopped"
    process = subprocess.Popen(command("--recipe", "demo", "--output", str(run)), cwd=ROOT, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while not (run / "metrics.jsonl").exists() or len(read_jsonl(run / "metrics.jsonl")) < 3:
        assert process.poll() is None and time.time() < deadline, "the run ended before it could be stopped"
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 2, output
    assert "SIGTERM: saving a checkpoint" in output and f"python train.py --resume {run}" in output
    stopped_at = int(output.split("interrupted at step ")[1].split(":")[0])
    assert 20 <= stopped_at < 200
    assert (run / "checkpoints" / f"checkpoint-{stopped_at}" / "trainer_state.json").exists()
    assert not (run / "model.safetensors").exists()
