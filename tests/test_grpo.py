"""method=grpo: the rewards, the recipe checks, and a few GRPO steps of the tiny model from a short SFT run, with
its run folder read by eval.py, and a run killed with SIGKILL after a checkpoint that resumes to the same end.

The GRPO runs are subprocesses: on the CPU kit/train/grpo switches Triton to its interpreter before trl loads its
kernels, which an in-process run after other tests (which import trl) could not do."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

import recipes
from kit.train.grpo import answer_of, relaxed_accuracy, short_answer
from recipes import RecipeError
from tests.conftest import ROOT, read_jsonl, run_train

# 2 questions x 4 answers a step: a group with a spread, and few tokens for the Triton interpreter
GRPO = ["synthetic_num_train=240", "synthetic_num_test=40", "max_steps=4", "logging_steps=1", "save_steps=2",
        "warmup_steps=1", "per_device_train_batch_size=8", "num_generations=4"]


def said(text):
    return [[{"role": "assistant", "content": text}]]  # a completion as TRL hands it over


# --- rewards ------------------------------------------------------------------------------------------------
def test_relaxed_accuracy_is_the_metric_against_every_accepted_answer():
    completions = said(" 12 ") + said("12.5") + said("13") + said("Yes") + said("45%")
    answers = [["10", "12"], ["12"], ["12"], ["no", "yes"], ["0.45"]]
    # within 5 % of one accepted answer; 13 is 8 % off; text ignoring case; "45%" reads as 0.45 (ChartQA's rule)
    assert relaxed_accuracy(completions, answers) == [1.0, 1.0, 0.0, 1.0, 1.0]


def test_short_answer_rewards_no_extra_words():
    completions = said("42") + said("The answer is 42.") + said("") + said("New York") + said("42\n42")
    answers = [["42"], ["42"], ["42"], ["New York"], ["42"]]
    assert short_answer(completions, answers) == [1.0, 0.0, 0.0, 1.0, 0.0]


def test_a_thinking_family_answers_after_its_think_block():
    think_end = "</think>"  # the marker a thinking family names
    assert answer_of("<think>B is taller than A</think>\nB", think_end) == "B"
    assert answer_of("<think>still thinking about B", think_end) is None
    completions = said("<think>A is 40, B is 60</think> B") + said("<think>B") + said("B")
    assert relaxed_accuracy(completions, [["B"]] * 3, think_end=think_end) == [1.0, 0.0, 0.0]
    assert short_answer(completions, [["B"]] * 3, think_end=think_end) == [1.0, 0.0, 0.0]
    assert relaxed_accuracy(said("B"), [["B"]]) == [1.0]  # a family that does not think: the whole text


# --- recipe checks ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, words", [
    (["method=grpo", "init_from="], ["init_from=RUN_DIR"]),
    (["init_from=runs/demo"], ["init_from", "method=grpo"]),
    (["method=grpo", "init_from=runs/demo", "num_generations=3"], ["per_device_train_batch_size",
                                                                   "num_generations=3"]),
    (["method=grpo", "init_from=runs/demo", "num_generations=1"], ["num_generations=1", "at least 2"]),
    (["method=grpo", "init_from=runs/demo", "reward_weights=1.0"], ["reward_weights", "two numbers"]),
    (["method=grpo", "init_from=runs/demo", "reward_weights=1.0,x"], ["reward_weights", "two numbers"]),
    (["method=grpo", "init_from=runs/demo", "eval_steps=10"], ["eval_steps=0", "eval.py"]),
    (["method=rl"], ["method", "sft, grpo"]),
])
def test_bad_grpo_settings_name_the_key(overrides, words):
    with pytest.raises(RecipeError) as error:
        recipes.load("demo", overrides)
    for word in words:
        assert word in str(error.value)


@pytest.mark.slow
def test_init_from_must_be_a_finished_run(tmp_path):
    import train

    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "run_config.json").write_text("{}")  # started, no weights yet
    for folder, words in [(tmp_path / "none", "no run_config.json"), (tmp_path / "half", "no final weights")]:
        result = CliRunner().invoke(train.main, ["--recipe", "demo_grpo", "--set", f"init_from={folder}",
                                                 "--output", str(tmp_path / "out")])
        assert result.exit_code == 2, result.output
        assert words in result.output and f"init_from={folder}" in result.output
    assert not (tmp_path / "out").exists()


# --- a GRPO run ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    return run_train(tmp_path_factory.mktemp("runs") / "sft", ["max_steps=10", "save_steps=10"])


def grpo_command(sft, output, *more):
    sets = [item for setting in [f"init_from={sft}", *GRPO, *more] for item in ("--set", setting)]
    return [sys.executable, str(ROOT / "train.py"), "--recipe", "demo_grpo", "--output", str(output), *sets]


@pytest.fixture(scope="module")
def grpo_run(sft_run, tmp_path_factory):
    output = tmp_path_factory.mktemp("runs") / "grpo"
    done = subprocess.run(grpo_command(sft_run, output), cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout + done.stderr
    return output


# --- the RL path: what the trainer samples from, how it scores, what it learns from ------------------------------
@pytest.fixture(scope="module")
def probe(sft_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("probe") / "probe.json"
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "grpo_probe.py"), str(sft_run), str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(out.read_text())


@pytest.mark.slow
def test_grpo_samples_from_the_prompt_sft_trained_on_and_eval_asks(probe):
    assert {row["qtype"] for row in probe["prompts"]} == {"count", "max"}
    for row in probe["prompts"]:
        assert row["grpo"] == row["sft"] == row["eval"], row["qtype"]
        assert row["grpo"].count(probe["image_pad"]) > 0  # the chart is in it


@pytest.mark.slow
def test_the_trainers_reward_call_scores_right_one_and_wrong_zero(probe):
    rows = probe["rewards"]
    assert {row["qtype"] for row in rows} == {"count", "max"}
    for right, wrong in zip(rows[::2], rows[1::2]):
        assert right["answer"] in right["accepted"] and wrong["answer"] not in wrong["accepted"]
        # [relaxed_accuracy, short_answer]: both one-word answers, only the right one correct
        assert right["rewards"] == [1.0, 1.0] and wrong["rewards"] == [0.0, 1.0], (right, wrong)


@pytest.mark.slow
def test_a_group_with_equal_rewards_gives_no_gradient(probe):
    equal, spread = probe["equal"], probe["spread"]
    assert equal and spread, "no group of 8 with equal rewards, or none with a spread, among 32 questions"
    assert len(set(equal["rewards"])) == 1 and equal["advantages"] == [0.0] * 8
    assert equal["grad_norm"] == 0.0
    # the same loss, sampled the same way, on a group whose answers differ in reward does move the model
    assert len(set(spread["rewards"])) > 1 and spread["grad_norm"] > 0


@pytest.mark.slow
def test_grpo_run_folder(sft_run, grpo_run):
    import torch
    from safetensors.torch import load_file

    config = json.loads((grpo_run / "run_config.json").read_text())
    assert config["recipe"]["method"] == "grpo" and config["recipe"]["init_from"] == str(sft_run)
    started = json.loads((sft_run / "run_config.json").read_text())["recipe"]
    for key in ("model_name_or_path", "finetune", "system_prompt", "max_pixels"):  # kept from the SFT run
        assert config["recipe"][key] == started[key]
    rows = read_jsonl(grpo_run / "metrics.jsonl")
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    for row in rows:
        assert {"loss", "reward", "reward_std", "frac_reward_zero_std", "kl", "completion_length",
                "reward_relaxed_accuracy", "reward_short_answer"} <= set(row)
        assert 0 <= row["frac_reward_zero_std"] <= 1
        assert 0 <= row["reward_relaxed_accuracy"] <= 1 and 0 <= row["reward_short_answer"] <= 1
        # the weighted sum TRL ranks by: 1.0 x relaxed accuracy + 0.25 x short answer (demo_grpo's weights)
        assert row["reward"] == pytest.approx(row["reward_relaxed_accuracy"] + 0.25 * row["reward_short_answer"],
                                              abs=1e-5)
        assert row["completion_length"] >= 1 and row["kl"] >= 0
    assert (grpo_run / "loss.png").stat().st_size > 0
    before, after = load_file(sft_run / "model.safetensors"), load_file(grpo_run / "model.safetensors")
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[key], after[key]) for key in before)  # it trained


@pytest.mark.slow
def test_grpo_from_a_qlora_run_trains_its_adapter_on_the_4bit_base(lora_run, tmp_path):
    """GRPO started from a QLoRA run (kit.model.prepare_4bit_for_training under peft's adapter): the adapter is
    what trains, in fp32 (TRL's trainer casts a 4-bit base's to bf16; the kit undoes it, as for SFT)."""
    import torch
    from safetensors.torch import load_file

    output = tmp_path / "grpo-qlora"
    done = subprocess.run(grpo_command(lora_run, output), cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout + done.stderr
    recipe = json.loads((output / "run_config.json").read_text())["recipe"]
    assert recipe["finetune"] == "lora" and recipe["load_in_4bit"]  # taken from the QLoRA run
    assert not (output / "model.safetensors").exists()
    before, after = load_file(lora_run / "adapter_model.safetensors"), load_file(output / "adapter_model.safetensors")
    assert before.keys() == after.keys() and all(after[key].dtype == torch.float32 for key in after)
    assert any(not torch.equal(before[key], after[key]) for key in before)  # it trained


@pytest.mark.slow
def test_eval_scores_a_grpo_run_like_any_other(grpo_run):
    import eval as evaluate

    result = CliRunner().invoke(evaluate.main, [str(grpo_run), "--compare", "base,finetuned", "--limit", "8"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads((grpo_run / "eval" / "report.json").read_text())
    assert set(report["systems"]) == {"base", "finetuned"} and report["samples"] == 8
    assert report["pairs"][0]["baseline"] == "base" and report["pairs"][0]["candidate"] == "finetuned"


@pytest.mark.slow
def test_sigkill_then_resume_ends_like_an_uninterrupted_run(sft_run, grpo_run, tmp_path):
    killed = tmp_path / "killed"
    process = subprocess.Popen(grpo_command(sft_run, killed), cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 900
    # killed once checkpoint-2 is complete (its marker is written last): before that, resume rightly starts over
    while not (killed / "checkpoints" / "checkpoint-2" / "complete.json").exists():
        assert process.poll() is None and time.time() < deadline, "no checkpoint before the run ended"
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (killed / "model.safetensors").exists()  # it really died mid-run

    resumed = subprocess.run([sys.executable, str(ROOT / "train.py"), "--resume", str(killed)], cwd=ROOT,
                             capture_output=True, text=True, timeout=1200)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming from" in resumed.stdout
    rows = read_jsonl(killed / "metrics.jsonl")
    assert [row["step"] for row in rows] == [1, 2, 3, 4]  # no repeats, same final step
    reference = {row["step"]: row for row in read_jsonl(grpo_run / "metrics.jsonl")}
    for row in rows[2:]:  # trained after the resume: the same questions, answers and rewards
        assert row["reward"] == pytest.approx(reference[row["step"]]["reward"], abs=1e-6), row
    assert (killed / "model.safetensors").exists()
