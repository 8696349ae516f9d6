"""A damaged run folder (weights gone, a safetensors file cut short, run_config.json broken, a recorded family that
is not its weights') meets every reader (train.py --resume, eval.py, merge.py, infer.py, the board) with one line
that names the file and the fix; --resume falls back to the newest checkpoint that loads and says which it
skipped. Nothing the user made is deleted."""

import json
import shutil

import pytest
from click.testing import CliRunner
from PIL import Image

from tests.conftest import read_jsonl, run_train

# checkpoints at 2 and 4, both kept; the run ends at 4
SHORT = ["synthetic_num_train=24", "synthetic_num_test=8", "max_steps=4", "save_steps=2", "logging_steps=1",
         "warmup_steps=0", "save_total_limit=0", "eval_steps=0"]


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    return run_train(tmp_path_factory.mktemp("damaged") / "run", SHORT)


@pytest.fixture()
def run_copy(short_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(short_run, copy)
    return copy


def cut(path, keep: float = 0.5):
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def invoke(script: str, args):
    import eval as evaluate
    import infer
    import merge

    main = {"eval": evaluate.main, "infer": infer.main, "merge": merge.main}[script]
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def reader_args(script: str, run, tmp_path):
    picture = tmp_path / "q.png"
    Image.new("RGB", (56, 56), "white").save(picture)
    return {"eval": [run, "--limit", 2, "--out", tmp_path / "out"],
            "infer": [run, "--image", picture, "--question", "How many bars?"],
            "merge": [run, "--to", "merged", "--out", tmp_path / "out"]}[script]


def one_line_error(result, *words):
    assert result.exit_code == 2, result.output
    error = [line for line in result.output.splitlines() if line.startswith("error")]
    assert len(error) == 1 and "Traceback" not in result.output, result.output
    for word in words:
        assert word in error[0], (word, error[0])


@pytest.mark.slow
@pytest.mark.parametrize("script", ["eval", "infer", "merge"])
@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_a_run_without_whole_weights_is_one_line_for_every_reader(run_copy, tmp_path, script, damage):
    weights = run_copy / "model.safetensors"
    if damage == "missing":
        weights.unlink()
    else:
        cut(weights)
    result = invoke(script, reader_args(script, run_copy, tmp_path))
    one_line_error(result, str(weights), damage, f"--resume {run_copy}")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_cut_checkpoint_is_one_line_for_eval(run_copy, tmp_path):
    checkpoint = run_copy / "checkpoints" / "checkpoint-2"
    cut(checkpoint / "model.safetensors", 0.9)
    result = invoke("eval", [checkpoint, "--limit", 2, "--out", tmp_path / "out"])
    one_line_error(result, str(checkpoint / "model.safetensors"), "truncated", "another checkpoint")


@pytest.mark.slow
@pytest.mark.parametrize("script", ["eval", "infer", "merge"])
def test_a_recorded_family_that_is_not_the_weights_is_refused(run_copy, tmp_path, script):
    config_path = run_copy / "run_config.json"
    config = json.loads(config_path.read_text())
    config["family"] = "qwen2.5-vl"  # the weights are Qwen2-VL's
    config_path.write_text(json.dumps(config))
    result = invoke(script, reader_args(script, run_copy, tmp_path))
    one_line_error(result, "config.json", "qwen2_vl", "qwen2.5-vl")


@pytest.mark.slow
def test_resume_refuses_weights_of_another_family_than_recorded(run_copy):
    from tests.conftest import train_cli

    (run_copy / "model.safetensors").unlink()
    config_path = run_copy / "run_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "family": "qwen2.5-vl"}))
    result = train_cli(["--resume", str(run_copy)])
    one_line_error(result, str(run_copy / "checkpoints" / "checkpoint-4" / "config.json"), "qwen2_vl")


@pytest.mark.slow
@pytest.mark.parametrize("script", ["eval", "infer", "merge"])
def test_a_broken_run_config_is_one_line(run_copy, tmp_path, script):
    (run_copy / "run_config.json").write_text('{"recipe": {"max_steps": 4')
    result = invoke(script, reader_args(script, run_copy, tmp_path))
    one_line_error(result, str(run_copy / "run_config.json"), "damaged")


@pytest.mark.slow
def test_resume_of_a_broken_run_config_is_one_line(run_copy):
    from tests.conftest import train_cli

    (run_copy / "run_config.json").write_text("{")
    one_line_error(train_cli(["--resume", str(run_copy)]), str(run_copy / "run_config.json"), "damaged")


@pytest.mark.slow
def test_resume_skips_a_cut_checkpoint_for_the_one_before_and_keeps_it(run_copy):
    from tests.conftest import train_cli

    (run_copy / "model.safetensors").unlink()  # the final save is lost too: the run must redo its last steps
    newest = run_copy / "checkpoints" / "checkpoint-4"
    cut(newest / "model.safetensors")
    result = train_cli(["--resume", str(run_copy)])
    assert result.exit_code == 0, result.output
    assert "skipped checkpoint-4" in result.output and "truncated" in result.output
    assert f"resuming from {run_copy / 'checkpoints' / 'checkpoint-2'}" in result.output
    kept = run_copy / "checkpoints" / "damaged-checkpoint-4" / "model.safetensors"
    assert kept.exists()  # set aside, not deleted
    assert (run_copy / "checkpoints" / "checkpoint-4" / "complete.json").exists()  # saved again, whole
    assert (run_copy / "model.safetensors").exists()
    steps = [row["step"] for row in read_jsonl(run_copy / "metrics.jsonl") if "loss" in row]
    assert steps[-1] == 4


def test_safetensors_checks_read_the_header(tmp_path):
    import torch
    from safetensors.torch import save_file

    from kit.run_checks import safetensors_problem, weights_problem

    path = tmp_path / "model.safetensors"
    save_file({"a": torch.zeros(64, 64), "b": torch.ones(8)}, str(path))
    (tmp_path / "config.json").write_text("{}")
    assert safetensors_problem(path) is None and weights_problem(tmp_path) is None
    size = path.stat().st_size
    cut(path, 0.99)
    assert "truncated" in safetensors_problem(path) and str(size) in safetensors_problem(path)
    path.write_bytes(b"\x10")
    assert "truncated" in weights_problem(tmp_path)
    path.unlink()
    assert "missing" in weights_problem(tmp_path)
    # a sharded model names the shard that is gone; an adapter folder names its adapter
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-1.safetensors"}}))
    assert weights_problem(tmp_path) == f"{tmp_path / 'model-1.safetensors'}: missing"
    (tmp_path / "adapter_config.json").write_text("{}")
    assert weights_problem(tmp_path) == f"{tmp_path / 'adapter_model.safetensors'}: missing (the weights)"


@pytest.mark.slow
def test_the_board_shows_a_damaged_run_as_damaged(run_copy):
    from kit.board import runs as board_runs

    cut(run_copy / "model.safetensors")
    (row,) = board_runs.runs(run_copy.parent)
    assert row["state"].startswith("damaged:") and "model.safetensors" in row["state"]


def test_a_gguf_pair_of_another_arch_than_recorded_is_refused(tmp_path):
    from kit.errors import UserError
    from kit.export.llama import pair_family

    model = tmp_path / "run-f16.gguf"
    (tmp_path / "gguf_report.json").write_text(json.dumps({"family": "qwen3.5"}))
    assert pair_family(model, "qwen35").name == "qwen3.5"
    with pytest.raises(UserError, match="arch is qwen2vl, not qwen3.5's"):
        pair_family(model, "qwen2vl")
    (tmp_path / "gguf_report.json").write_text("{")
    with pytest.raises(UserError, match="gguf_report.json: damaged"):
        pair_family(model, "qwen35")
