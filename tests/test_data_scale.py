"""Hugging Face sources at scale: hf: folders, lazy samples, flat memory, held-out rows, in-training accuracy."""

import json
import sys

import pytest

import bench_data
from tests.conftest import ROOT, read_jsonl, train_cli


@pytest.fixture(scope="module")
def parquet_folder(tmp_path_factory):
    return bench_data.build_parquet(tmp_path_factory.mktemp("pq") / "charts", 24, pool=3, eval_rows=6)


def hf_recipe(source: str) -> dict:
    from recipes import load

    recipe, _ = load("chartqa", [f"dataset=hf:{source}"])
    return recipe


def test_hf_reads_a_parquet_folder_lazily(parquet_folder):
    import data
    from data.hf import LazySamples
    from kit.inputs.chat import load_image

    train = data.load(hf_recipe(parquet_folder), "train")
    val = data.load(hf_recipe(parquet_folder), "val")
    assert isinstance(train, LazySamples) and len(train) == 24 and len(val) == 6
    sample = train[5]
    assert sample["images"][0]["bytes"][:8] == b"\x89PNG\r\n\x1a\n"  # still encoded: decoded per batch
    assert load_image(sample["images"][0]).size in bench_data.SIZES
    assert sample["messages"][1]["content"][0]["text"] == sample["answers"][0] == "5"
    assert sample["subset"] == "augmented" and "row 5" in sample["messages"][0]["content"][1]["text"]
    assert [s["id"] for s in train[3:6]] == ["charts-train-3", "charts-train-4", "charts-train-5"]
    assert len(data.load(hf_recipe(parquet_folder), "train", limit=7)) == 7  # --plan-samples reads 7 rows


def test_hf_reads_a_save_to_disk_folder(parquet_folder, tmp_path):
    import datasets

    import data

    files = {split: [str(f) for f in parquet_folder.glob(f"{split}-*.parquet")] for split in ("train", "val")}
    datasets.load_dataset("parquet", data_files=files).save_to_disk(str(tmp_path / "saved"))
    from_disk = data.load(hf_recipe(tmp_path / "saved"), "val")
    from_parquet = data.load(hf_recipe(parquet_folder), "val")
    assert [s["messages"] for s in from_disk] == [s["messages"] for s in from_parquet]
    assert [s["images"][0]["bytes"] for s in from_disk] == [s["images"][0]["bytes"] for s in from_parquet]


def test_hf_mistakes_are_one_line(parquet_folder, tmp_path):
    result = train_cli(["--recipe", "chartqa", "--plan", "--set", f"dataset=hf:{parquet_folder}",
                        "--set", "model_name_or_path=tiny", "--set", "dataset_columns=question=question"])
    assert result.exit_code == 2 and "no column 'question' for the question" in result.output
    assert "Traceback" not in result.output
    result = train_cli(["--recipe", "chartqa", "--plan", "--set", f"dataset=hf:{parquet_folder}",
                        "--set", "model_name_or_path=tiny", "--set", "eval_split=test"])
    assert result.exit_code == 2 and "no parquet file of split 'test'" in result.output


def test_offline_without_a_copy_fails_fast_naming_the_fix(monkeypatch, tmp_path):
    from datasets import config

    monkeypatch.setattr(config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(config, "HF_DATASETS_CACHE", tmp_path)
    result = train_cli(["--recipe", "chartqa", "--plan", "--set", "model_name_or_path=tiny"])
    assert result.exit_code == 2
    line = result.output.strip().splitlines()[-1]
    assert "HuggingFaceM4/ChartQA" in line and "save_to_disk" in line and "--set dataset=hf:" in line


def peak_plan_rss(folder, cache) -> float:
    """Peak RSS (GB) of `train.py --plan` and its children, from a fresh preflight cache."""
    env = bench_data.fresh_caches(cache)
    command = [sys.executable, str(ROOT / "train.py"), "--recipe", "chartqa", "--plan", "--set",
               f"dataset=hf:{folder}", "--set", "model_name_or_path=tiny", "--set", "eval_split=",
               "--set", "eval_steps=0"]
    return bench_data.measure(command, env)["peak_gb"]


@pytest.mark.slow
def test_plan_memory_is_flat_in_the_row_count(tmp_path):
    """Today's eager loader held every chart decoded (800x557 RGBA: 1.8 MB a row, +8 GB from 500 to 5,000
    rows); lazy samples stay within 1 GB of the 500-row run at 5,000. Measured: 0.73 -> 1.31 GB, the growth
    being the two preflight worker processes that 2,000+ rows start (a fixed cost, not a per-row one)."""
    small = bench_data.build_parquet(tmp_path / "500", 500, pool=8)
    large = bench_data.build_parquet(tmp_path / "5000", 5000, pool=8)
    rss_small, rss_large = peak_plan_rss(small, tmp_path / "c1"), peak_plan_rss(large, tmp_path / "c2")
    print(f"peak RSS: {rss_small:.2f} GB at 500 rows, {rss_large:.2f} GB at 5,000 rows")
    assert rss_large - rss_small < 1.0, (rss_small, rss_large)  # eager decoding would add ~8 GB


@pytest.mark.slow
def test_heldout_rows_never_train_and_training_accuracy_matches_eval(tmp_path, monkeypatch):
    from click.testing import CliRunner

    import eval as evaluate
    from kit.train import progress

    trained_ids = []
    original = progress.CountingCollator.__call__

    def record(self, samples):
        trained_ids.extend(s["id"] for s in samples)
        return original(self, samples)

    monkeypatch.setattr(progress.CountingCollator, "__call__", record)
    run = tmp_path / "run"
    args = ["--recipe", "demo", "--output", str(run)]
    for item in ["synthetic_num_train=120", "max_steps=20", "logging_steps=10", "save_steps=10", "warmup_steps=2",
                 "eval_fraction=0.2", "eval_steps=10", "eval_samples=12"]:
        args += ["--set", item]
    result = train_cli(args)
    assert result.exit_code == 0, result.output
    held = read_jsonl(run / "heldout.jsonl")
    assert len(held) == 24 and sum(r["during_training"] for r in held) == 12
    assert trained_ids and not {r["id"] for r in held} & set(trained_ids)
    assert len(set(trained_ids)) == 96  # every other row did train
    logged = [r for r in read_jsonl(run / "metrics.jsonl") if "eval_loss" in r]
    assert [r["step"] for r in logged] == [10, 20] and all(r["eval_questions"] == 12 for r in logged)
    assert "eval 00020/00020 | eval loss" in result.output
    # eval.py on the step-20 checkpoint, its default rows (the held-out ones), the first 12 as in training
    out = tmp_path / "eval"
    scored = CliRunner().invoke(evaluate.main, [str(run / "checkpoints" / "checkpoint-20"), "--limit", "12",
                                                "--compare", "finetuned", "--out", str(out)], catch_exceptions=False)
    assert scored.exit_code == 0, scored.output
    assert "held-out rows of the run" in scored.output
    rows = read_jsonl(out / "predictions.jsonl")
    during = read_jsonl(run / "heldout_answers" / "step-20.jsonl")
    assert [r["id"] for r in rows] == [r["id"] for r in during]
    assert [r["systems"]["finetuned"]["answer"] for r in rows] == [r["answer"] for r in during]
    accuracy = sum(r["systems"]["finetuned"]["relaxed"] for r in rows) / len(rows)
    assert accuracy == logged[-1]["eval_relaxed_accuracy"]


def test_eval_refuses_to_score_training_rows_by_default(tmp_path):
    from click.testing import CliRunner

    import eval as evaluate

    run = tmp_path / "run"
    run.mkdir()
    recipe = {"dataset": "jsonl:questions.jsonl", "system_prompt": "", "backend": "hf", "limit": 0}
    (run / "run_config.json").write_text(json.dumps({"recipe": recipe}))
    result = CliRunner().invoke(evaluate.main, [str(run), "--compare", "finetuned"])
    assert result.exit_code == 2 and "every row was trained on" in result.output


@pytest.mark.slow
def test_report_to_tensorboard_writes_event_files(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    args = ["--recipe", "demo", "--output", str(run)]
    for item in ["synthetic_num_train=40", "max_steps=4", "logging_steps=2", "save_steps=4", "warmup_steps=1",
                 "report_to=tensorboard"]:
        args += ["--set", item]
    result = train_cli(args)
    assert result.exit_code == 0, result.output
    events = list((run / "logs").glob("events.out.tfevents.*"))
    assert events
    accumulator = EventAccumulator(str(events[0].parent))
    accumulator.Reload()
    losses = accumulator.Scalars("train/loss")
    metrics = [r for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
    assert [e.step for e in losses] == [r["step"] for r in metrics]
    assert [round(e.value, 4) for e in losses] == [round(r["loss"], 4) for r in metrics]


@pytest.mark.slow
def test_eval_scores_a_model_folder_and_a_gguf_pair_like_the_run(full_run, tmp_path):
    """The same 6 test charts: the run (transformers), its GGUF pair (llama.cpp) and the tiny base as a model."""
    import shutil

    from click.testing import CliRunner

    import eval as evaluate
    import merge
    from kit.export.converter import find_converter

    def score(target, out, *extra):
        result = CliRunner().invoke(evaluate.main, [str(target), "--data", "synthetic", "--limit", "6", "--compare",
                                                    "finetuned", "--out", str(out), *extra], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return [r["systems"]["finetuned"]["answer"] for r in read_jsonl(out / "predictions.jsonl")]

    from_run = score(full_run, tmp_path / "run")
    assert len(score("tiny", tmp_path / "tiny")) == 6  # a model folder / hub id is scored as `finetuned`
    out = tmp_path / "export"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LLAMA_CPP_DIR", str(find_converter().parent))
        result = CliRunner().invoke(merge.main, [str(full_run), "--to", "gguf", "--quant", "f32", "--no-verify",
                                                 "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    shutil.copy(full_run / "run_config.json", out / "gguf")  # the run's pixel limits and prompt
    assert score(out / "gguf", tmp_path / "gguf") == from_run
