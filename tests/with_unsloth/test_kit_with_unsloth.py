"""The kit's scripts with Unsloth's patches in place (see conftest.py for what stands in for what).

Each test drives the scripts' own code (train.py, eval.py, infer.py through their click commands, in this
process, where unsloth was imported first) on the tiny model with `--backend unsloth`.
"""

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.conftest import read_jsonl

# Four steps, a checkpoint every two: enough for a checkpoint, a resume and two steps after it.
QUICK = ["synthetic_num_train=32", "synthetic_num_test=8", "max_steps=4", "save_steps=2", "logging_steps=1",
         "warmup_steps=1", "per_device_train_batch_size=4"]
LORA = ["finetune=lora", "lora_r=8", "lora_alpha=16", "learning_rate=5e-3"]


def invoke(main, args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result


def train_args(output, *extra):
    args = ["--recipe", "demo", "--backend", "unsloth", "--output", output]
    for item in [*QUICK, *LORA, *extra]:
        args += ["--set", item]
    return args


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """train.py --backend unsloth, LoRA on the tiny model: 4 steps with checkpoints at 2 and 4."""
    import train

    folder = tmp_path_factory.mktemp("runs") / "lora"
    result = invoke(train.main, train_args(folder))
    assert result.exit_code == 0, result.output
    return folder, result.output


def test_unsloth_patches_are_active():
    """The lane really runs under Unsloth: the image processor's pixel attributes are its read-only
    properties, and TRL's SFTTrainer is the class Unsloth generated, written under the kit's cache (not into
    ./unsloth_compiled_cache)."""
    import trl
    from transformers import Qwen2VLImageProcessor

    from kit.backend import unsloth_compile_dir
    from kit.train.sft import trainer_class

    pixels = Qwen2VLImageProcessor.__dict__["min_pixels"]
    assert isinstance(pixels, property) and pixels.fset is None
    assert trl.SFTTrainer.__name__ == "UnslothSFTTrainer"
    assert trl.SFTTrainer in trainer_class().__mro__
    generated = unsloth_compile_dir() / "UnslothSFTTrainer.py"
    assert generated.exists(), f"no {generated}"
    assert not (Path.cwd() / "unsloth_compiled_cache").exists()  # not in the folder the user runs from


def test_processor_setup_and_collator():
    """What train.py, eval.py and infer.py do to the processor (set_pixels), then the training collator."""
    from transformers import AutoProcessor

    from data.synthetic import generate
    from kit.inputs.chat import IGNORE, VisionCollator, set_pixels
    from kit.model import resolve

    processor = AutoProcessor.from_pretrained(resolve("tiny"))
    set_pixels(processor, 3136, 19600)
    image_processor = processor.image_processor
    assert (image_processor.min_pixels, image_processor.max_pixels) == (3136, 19600)  # Unsloth's properties
    samples = generate("train", 4, seed=1, size=280, grid=28, cache=None, progress=False)  # 280x280 > max_pixels
    batch = VisionCollator(processor, max_length=256)(samples)
    # 280x280 is shrunk to 140x140 by max_pixels: 10x10 patches of 14 pixels per image
    assert batch["image_grid_thw"].tolist() == [[1, 10, 10]] * 4
    for row, sample in enumerate(samples):
        kept = batch["labels"][row][batch["labels"][row] != IGNORE]
        assert processor.tokenizer.decode(kept) == sample["messages"][-1]["content"][0]["text"] + "<|im_end|>"


def test_plan(tmp_path):
    """train.py --plan: recipe, data, processor set-up and the token/memory plan."""
    import train

    result = invoke(train.main, [*train_args(tmp_path / "plan"), "--plan"])
    assert result.exit_code == 0, result.output
    assert "backend unsloth" in result.output and "max_pixels" in result.output


def test_train_writes_checkpoints_and_an_adapter(lora_run):
    """train.py's trainer (kit/train/sft.py; checkpoints marked complete by kit/train/checkpoints.py) around Unsloth's
    generated SFTTrainer, with Unsloth's for_training; the base comes from the from_pretrained stand-in."""
    folder, output = lora_run
    assert "backend unsloth" in output
    from kit.model import resolve

    assert f"unsloth: loaded {resolve('tiny')}\n" in output  # the checkpoint loaded, by its exact name
    assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    assert (folder / "adapter_config.json").exists() and (folder / "adapter_model.safetensors").exists()
    steps = [row["step"] for row in read_jsonl(folder / "metrics.jsonl") if "loss" in row]
    assert steps == [1, 2, 3, 4]
    assert json.loads((folder / "run_config.json").read_text())["backend"] == "unsloth"


def test_resume_from_a_checkpoint_continues_the_same_run(lora_run, tmp_path):
    """A run stopped after checkpoint-2 (its later checkpoint and weights removed, as a crash leaves it) resumes
    through train.py --resume under Unsloth's trainer, same batches, same losses."""
    import train

    reference, _ = lora_run
    stopped = tmp_path / "stopped"
    shutil.copytree(reference, stopped)
    shutil.rmtree(stopped / "checkpoints" / "checkpoint-4")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (stopped / name).unlink()
    result = invoke(train.main, ["--resume", stopped])
    assert result.exit_code == 0, result.output
    assert "resuming from" in result.output and "checkpoint-2" in result.output
    losses = {row["step"]: row["loss"] for row in read_jsonl(reference / "metrics.jsonl") if "loss" in row}
    resumed = {row["step"]: row["loss"] for row in read_jsonl(stopped / "metrics.jsonl") if "loss" in row}
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in (3, 4):
        assert resumed[step] == pytest.approx(losses[step], rel=1e-3), step
    assert (stopped / "adapter_model.safetensors").exists()


def test_eval_generates_with_the_run(lora_run, tmp_path, calls):
    """eval.py on the run with --backend unsloth: load_run (base through the from_pretrained stand-in, the adapter
    by load_adapter), Unsloth's for_inference, set_pixels, batched generation (transformers' generate: Unsloth's
    fast generate is installed by the real from_pretrained only), for the base and the fine-tuned model."""
    import eval as evaluate

    folder, _ = lora_run
    out = tmp_path / "eval"
    result = invoke(evaluate.main, [folder, "--data", "synthetic", "--limit", 4, "--compare", "base,finetuned",
                                    "--backend", "unsloth", "--max-new-tokens", 4, "--out", out])
    assert result.exit_code == 0, result.output
    rows = read_jsonl(out / "predictions.jsonl")
    assert len(rows) == 4 and all(set(row["systems"]) == {"base", "finetuned"} for row in rows)
    assert ("for_inference", {}) in calls


def test_qlora_trains_evaluates_on_its_4bit_base_and_merges(tmp_path, calls):
    """QLoRA under Unsloth's trainer: train.py with load_in_4bit=true asks Unsloth's loader for the 4-bit base (the
    stand-in loads bitsandbytes' NF4 through transformers, with the family's 16-bit layers); eval.py scores the run
    on that base through Unsloth's for_inference; merge.py compares it, as trained, with the merged 16-bit model.
    Not run here (CUDA only): Unsloth's own 4-bit loading and pre-quantized dynamic-4bit checkpoints, and its
    QLoRA kernels; the GGUF steps after merging do not involve Unsloth and are tested in the main lane."""
    import eval as evaluate
    import merge
    import train

    folder = tmp_path / "qlora"
    result = invoke(train.main, train_args(folder, "load_in_4bit=true"))
    assert result.exit_code == 0, result.output
    assert [kw["load_in_4bit"] for name, kw in calls if name == "from_pretrained"] == [True]
    calls.clear()
    result = invoke(evaluate.main, [folder, "--limit", 4, "--compare", "finetuned", "--backend", "unsloth",
                                    "--max-new-tokens", 4, "--out", tmp_path / "eval"])
    assert result.exit_code == 0, result.output
    assert [kw["load_in_4bit"] for name, kw in calls if name == "from_pretrained"] == [True]  # scored as trained
    assert len(read_jsonl(tmp_path / "eval" / "predictions.jsonl")) == 4
    result = invoke(merge.main, [folder, "--to", "merged", "--out", tmp_path / "export"])
    assert result.exit_code == 0, result.output
    export = json.loads((folder / "export.json").read_text())
    assert export["four_bit"] and export["as_trained"]["num_samples"] == 16
    assert export["parity"]["identical_answers"] == export["parity"]["num_samples"]


def test_infer_answers_a_question(lora_run, tmp_path):
    """infer.py on the run with --backend unsloth, as its docstring shows (same stand-in as for eval.py)."""
    import infer
    from data.synthetic import generate

    folder, _ = lora_run
    sample = generate("test", 1, seed=5, size=140, grid=28, layout="aligned", cache=tmp_path, progress=False)[0]
    result = invoke(infer.main, [folder, "--image", sample["images"][0], "--question", "How many bars are there?",
                                 "--backend", "unsloth", "--max-new-tokens", 4])
    assert result.exit_code == 0, result.output
    assert result.output.strip()


@pytest.mark.parametrize("changes, expected", [
    ({}, {"from_pretrained": {"use_exact_model_name": True, "use_gradient_checkpointing": False,
                              "full_finetuning": False},
          "get_peft_model": {"use_gradient_checkpointing": False, "r": 8}}),
    ({"gradient_checkpointing": True, "unsloth_dynamic_4bit": True},
     {"from_pretrained": {"use_exact_model_name": False, "use_gradient_checkpointing": "unsloth"},
      "get_peft_model": {"use_gradient_checkpointing": "unsloth"}}),
    ({"finetune": "full"}, {"from_pretrained": {"full_finetuning": True}}),
])
def test_contract_keywords_bind_to_the_installed_unsloth(calls, changes, expected):
    """Every keyword the kit passes to FastVisionModel.from_pretrained, get_peft_model, for_training and
    for_inference binds to the installed signatures as a named parameter (conftest.check_binds), and the
    recipe's gradient_checkpointing / unsloth_dynamic_4bit / finetune reach them."""
    import recipes
    from kit import model as models
    from kit.evaluate.generate import prepare_for_inference

    recipe, _ = recipes.load("demo", [*LORA, "lora_r=8", *[f"{k}={v}" for k, v in changes.items()]])
    model, _ = models.load_for_training(models.resolve("tiny"), recipe, "unsloth", __import__("torch").float32)
    prepare_for_inference(model, "unsloth")
    made = {name: kwargs for name, kwargs in calls}
    assert set(made) == {"from_pretrained", "for_training", "for_inference"} | \
        ({"get_peft_model"} if recipe["finetune"] == "lora" else set())
    for name, keywords in expected.items():
        for key, value in keywords.items():
            assert made[name].get(key, "<not passed>") == value, (name, key)


def test_precision_fp32_is_refused_because_unsloths_trainer_replaces_it(tmp_path):
    """Unsloth's generated trainer turns bf16/fp16 autocast on when both are off (the silent replacement);
    the kit therefore refuses precision=fp32 on the unsloth backend in one line."""
    import trl
    from datasets import Dataset

    import train
    from kit import model as models
    from kit.backend import BackendError, precision

    with pytest.raises(BackendError, match="precision=fp32"):
        precision("fp32", "unsloth")
    result = invoke(train.main, [*train_args(tmp_path / "fp32"), "--set", "precision=fp32"])
    assert result.exit_code == 2 and "precision=fp32 is not available on the unsloth backend" in result.output

    model, processor = models.load_base(models.resolve("tiny"), "hf", False, __import__("torch").float32)
    args = trl.SFTConfig(output_dir=str(tmp_path / "out"), bf16=False, fp16=False, report_to="none",
                         use_cpu=True, dataset_kwargs={"skip_prepare_dataset": True})
    trl.SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"row": [0]}),
                   processing_class=processor, data_collator=lambda rows: rows)
    assert args.bf16 or args.fp16


def test_tiny_model_builds_under_unsloths_tokenizer_patches(tmp_path, monkeypatch):
    """A fresh cache: the tiny model's tokenizer and processor are built with Unsloth's tokenizer patches
    active and tokenize the chat template exactly as the copy built without them (the shared cache)."""
    from transformers import AutoProcessor

    from kit import model as models

    reference = AutoProcessor.from_pretrained(models.resolve("tiny"))
    monkeypatch.setenv("QWEN2VL_KIT_CACHE", str(tmp_path))
    built = AutoProcessor.from_pretrained(models.resolve("tiny"))
    assert str(tmp_path) in models.resolve("tiny")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many bars?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "4"}]}]
    text = reference.apply_chat_template(messages, tokenize=False)
    assert built.apply_chat_template(messages, tokenize=False) == text
    assert built.tokenizer(text)["input_ids"] == reference.tokenizer(text)["input_ids"]


def test_bench_worker_times_the_unsloth_backend():
    """bench.py's worker (one backend per process, here this one): load_for_training, set_pixels and the
    trainer class train.py uses, timed for a few steps."""
    import bench

    result = bench.measure("unsloth", "demo", ["synthetic_size=140", "per_device_train_batch_size=2"], steps=2,
                           warmup=1, memory_cap=None)
    assert result["backend"] == "unsloth" and result["tokens_per_s"] > 0


# --- Qwen2.5-VL (kit/families/qwen2_5_vl.py) ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def qwen25_run(tmp_path_factory):
    """The same LoRA run on the tiny Qwen2.5-VL, with adapters on its vision tower too."""
    import train

    folder = tmp_path_factory.mktemp("runs") / "qwen25"
    result = invoke(train.main, train_args(folder, "model_name_or_path=tiny:qwen2.5-vl",
                                           "finetune_vision_layers=true"))
    assert result.exit_code == 0, result.output
    return folder, result.output


def test_qwen25vl_trains_answers_and_adapts_its_vision_mlp(qwen25_run, tmp_path):
    """Unsloth's patches with the 2.5 processor and model: train, the adapter on the SwiGLU vision MLP, infer."""
    from safetensors import safe_open

    import infer
    from data.synthetic import generate
    from kit.model import resolve

    folder, output = qwen25_run
    assert f"unsloth: loaded {resolve('tiny:qwen2.5-vl')}\n" in output
    config = json.loads((folder / "run_config.json").read_text())
    assert (config["family"], config["backend"]) == ("qwen2.5-vl", "unsloth")
    with safe_open(folder / "adapter_model.safetensors", "pt") as weights:
        vision = {key.split(".mlp.")[1].split(".")[0] for key in weights.keys() if ".visual." in key and ".mlp." in key}  # noqa: SIM118
    assert vision == {"gate_proj", "up_proj", "down_proj"}
    sample = generate("test", 1, seed=5, size=140, grid=config["recipe"]["synthetic_grid"], layout="aligned",
                      cache=tmp_path, progress=False)[0]
    result = invoke(infer.main, [folder, "--image", sample["images"][0], "--question", "How many bars are there?",
                                 "--backend", "unsloth", "--max-new-tokens", 4])
    assert result.exit_code == 0, result.output
    assert result.output.strip()


# --- Qwen3-VL and Qwen3.5 (kit/families/qwen3_vl.py, qwen3_5.py) --------------------------------------------------
@pytest.mark.parametrize("name, vision_mlp, language", [
    ("qwen3-vl", {"linear_fc1", "linear_fc2"}, {"q_proj", "k_proj", "v_proj", "o_proj"}),
    ("qwen3.5", {"linear_fc1", "linear_fc2"}, {"in_proj_qkv", "in_proj_z", "out_proj", "q_proj"})])
def test_qwen3_families_train_and_answer_with_unsloth(name, vision_mlp, language, tmp_path):
    """Unsloth's patches with the Qwen3-VL processor (16-pixel patches, 32-pixel tokens) and the Qwen3 / Qwen3.5
    models (DeepStack; Gated DeltaNet on the CPU's torch fallback): LoRA trains, adapters sit on the family's
    modules, infer answers with thinking off."""
    from safetensors import safe_open

    import infer
    import train
    from data.synthetic import generate

    folder = tmp_path / "run"
    result = invoke(train.main, train_args(folder, f"model_name_or_path=tiny:{name}", "finetune_vision_layers=true",
                                           "synthetic_size=160", "max_pixels=25600"))
    assert result.exit_code == 0, result.output
    config = json.loads((folder / "run_config.json").read_text())
    assert (config["family"], config["backend"], config["recipe"]["synthetic_grid"]) == (name, "unsloth", 32)
    with safe_open(folder / "adapter_model.safetensors", "pt") as weights:
        names = {key.split(".lora_")[0].rsplit(".", 1)[-1] for key in weights.keys()}  # noqa: SIM118
        vision = {key.split(".mlp.")[1].split(".")[0] for key in weights.keys() if ".visual." in key and ".mlp." in key}  # noqa: SIM118
    assert vision == vision_mlp and language <= names
    sample = generate("test", 1, seed=5, size=160, grid=32, layout="aligned", cache=tmp_path, progress=False)[0]
    result = invoke(infer.main, [folder, "--image", sample["images"][0], "--question", "How many bars are there?",
                                 "--backend", "unsloth", "--max-new-tokens", 4])
    assert result.exit_code == 0, result.output
    assert result.output.strip() and "<think>" not in result.output
