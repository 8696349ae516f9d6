import json

from data.synthetic import generate
from kit.inputs.chat import VisionCollator, set_pixels
from kit.plan.estimate import estimate_memory, model_shape, per_gpu_memory, preflight, trained_state_bytes, weight_parts
from recipes import load
from tests.conftest import train_cli


def test_plan_token_counts_equal_the_collators(tmp_path):
    from transformers import AutoProcessor

    from kit.model import tiny_model_dir

    processor = AutoProcessor.from_pretrained(tiny_model_dir())
    recipe, _ = load("demo")
    set_pixels(processor, recipe["min_pixels"], recipe["max_pixels"])
    samples = generate("train", 16, seed=2, question_types=["count", "max", "value"], grid=28, cache=tmp_path,
                       progress=False)
    findings, counts = preflight(samples, processor, {"system_prompt": "Answer briefly.", "max_length": 512})
    assert not findings and len(counts) == len(samples)
    collator = VisionCollator(processor, max_length=512, system_prompt="Answer briefly.")
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    for sample, (image, text) in zip(samples, counts):
        batch = collator([sample])
        assert image == int((batch["input_ids"] == image_pad).sum())
        assert image + text == int(batch["attention_mask"].sum())


def test_memory_estimate_grows_with_what_it_should():
    from kit.model import resolve

    shape = model_shape(resolve("random:qwen2-vl-7b", weights=False))
    recipe, _ = load("chartqa")
    base = estimate_memory(shape, recipe, 700, 400, "bf16")
    bigger_batch = estimate_memory(shape, dict(recipe, per_device_train_batch_size=4), 700, 400, "bf16")
    sixteen_bit = estimate_memory(shape, dict(recipe, load_in_4bit=False), 700, 400, "bf16")
    assert bigger_batch["total"] > base["total"] and bigger_batch["base weights"] == base["base weights"]
    assert sixteen_bit["base weights"] > 2 * base["base weights"]  # embeddings are not quantized in either
    assert base["total"] > sum(v for k, v in base.items() if k != "total")  # fragmentation margin


def test_memory_parts_have_one_source():
    """The printed weight parts, the total and the per-GPU strategies price weights and trained state alike."""
    from kit.model import resolve

    shape = model_shape(resolve("random:qwen2-vl-7b", weights=False))
    recipe, _ = load("chartqa")
    for four_bit in (True, False):
        for backend in ("hf", "unsloth"):
            chosen = dict(recipe, load_in_4bit=four_bit)
            memory = estimate_memory(shape, chosen, 700, 400, "bf16", backend)
            assert memory["base weights"] == sum(weight_parts(shape, chosen, "bf16").values())
            assert memory["LoRA/trained weights + grads + optimizer"] == trained_state_bytes(shape, chosen)
            ddp = per_gpu_memory(shape, chosen, memory, 2, "bf16")["DDP"]
            assert ddp > memory["total"]  # DDP adds its gradient buckets to the one-GPU peak
    # a 4-bit base's embeddings stay 16-bit on both backends (kit.model.prepare_4bit_for_training)
    hf, unsloth = (estimate_memory(shape, recipe, 700, 400, "bf16", b)["base weights"] for b in ("hf", "unsloth"))
    assert hf == unsloth


def test_plan_cli_prints_histograms_and_a_verdict(tmp_path):
    result = train_cli(["--recipe", "chartqa", "--plan", "--gpu", "16GB", "--output", str(tmp_path / "run"),
                        "--set", "dataset=synthetic", "--set", "synthetic_num_train=20", "--set", "eval_split=",
                        "--set", "model_name_or_path=random:qwen2-vl-7b", "--set", "per_device_train_batch_size=16"])
    assert result.exit_code == 0, result.output
    for words in ("image tokens: min", "text tokens: min", "over max_length", "suggested max_pixels",
                  "steps per epoch: 1", "base weights", "does not fit", "per_device_train_batch_size"):
        assert words in result.output, words
    # a plan trains nothing and writes only plan.json, with what it printed
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["plan.json"]
    written = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert written["rows"] == 20 and written["steps_per_epoch"] == 1 and written["fits"] is False
    assert written["gpu"]["bytes"] == 16 * 1024**3 and written["memory_bytes"]["total"] > written["gpu"]["bytes"]
    assert written["tokens"]["image"]["max"] >= written["tokens"]["image"]["min"] > 0
    # a suggestion the processor keeps as given: whole tokens of Qwen2-VL's 28 x 28 pixels
    suggested = written["suggested_max_pixels"]
    assert suggested > 0 and suggested % (28 * 28) == 0, suggested


def test_unknown_gpu_size_is_one_clear_line(tmp_path):
    result = train_cli(["--recipe", "demo", "--plan", "--gpu", "12 bananas", "--output", str(tmp_path / "run"),
                        "--set", "synthetic_num_train=8"])
    assert result.exit_code == 2
    assert "--gpu 12 bananas: give the card's memory (e.g. 12GB" in result.output and "Traceback" not in result.output

