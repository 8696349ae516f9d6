import json

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import read_jsonl, train_cli


def test_full_run_writes_model_config_and_metrics(full_run):
    assert (full_run / "model.safetensors").exists()
    assert (full_run / "preprocessor_config.json").exists() or (full_run / "processor_config.json").exists()
    config = json.loads((full_run / "run_config.json").read_text())
    assert config["recipe_name"] == "demo"
    assert config["recipe"]["max_steps"] == 60  # the override, not the recipe's 1500
    assert "max_steps=60" in config["overrides"]
    assert config["backend"] == "hf" and config["versions"]["transformers"]
    rows = read_jsonl(full_run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 10, 20, 30, 40, 50, 60]
    for row in rows:
        assert row["ms_per_step"] > 0 and row["tokens_per_s"] > 0 and row["peak_mem_gb"] > 0
    assert rows[-1]["loss"] <= 0.7 * rows[0]["loss"], rows  # falls by at least 30 %
    assert (full_run / "loss.png").stat().st_size > 0


def test_full_run_weights_changed_and_reload(full_run):
    from transformers import AutoModelForImageTextToText

    from kit.model import tiny_model_dir

    trained = AutoModelForImageTextToText.from_pretrained(full_run)
    base = AutoModelForImageTextToText.from_pretrained(tiny_model_dir())
    saved = load_file(full_run / "model.safetensors")
    for name, tensor in trained.state_dict().items():
        if name in saved:
            assert torch.equal(tensor, saved[name])
    moved = [name for name, tensor in base.state_dict().items()
             if not torch.equal(tensor, trained.state_dict()[name])]
    assert any("visual" in name for name in moved) and any("language_model" in name for name in moved)


def test_lora_adapter_reloads_onto_the_tiny_model(lora_run):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from kit.model import tiny_model_dir

    adapter = load_file(lora_run / "adapter_model.safetensors")
    assert adapter and all("lora_" in name for name in adapter)
    assert any("lora_B" in name and tensor.abs().sum() > 0 for name, tensor in adapter.items())  # trained
    model = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(tiny_model_dir()), lora_run)
    loaded = {name: tensor for name, tensor in model.state_dict().items() if "lora_" in name}
    for name, tensor in adapter.items():
        match = [value for key, value in loaded.items() if key.replace(".default", "").endswith(
            name.split("base_model.model.", 1)[-1])]
        assert match and torch.equal(match[0], tensor), name


def test_existing_run_is_not_overwritten(full_run):
    before = {p.name: p.stat().st_mtime_ns for p in full_run.iterdir()}
    result = train_cli(["--recipe", "demo", "--output", str(full_run), "--set", "max_steps=1"])
    assert result.exit_code == 2
    assert "--force" in result.output and "--resume" in result.output
    assert {p.name: p.stat().st_mtime_ns for p in full_run.iterdir()} == before


def test_bad_override_is_one_clear_line(tmp_path):
    result = train_cli(["--recipe", "demo", "--output", str(tmp_path / "x"), "--set", "lerning_rate=1"])
    assert result.exit_code == 2
    assert "learning_rate" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "x").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_unsloth_without_gpu_is_refused(tmp_path):
    result = train_cli(["--recipe", "demo", "--output", str(tmp_path / "x"), "--backend", "unsloth"])
    assert result.exit_code == 2
    assert "--backend hf" in result.output.strip().splitlines()[-1]  # the one line names the fix
    assert not (tmp_path / "x").exists()


def test_precision_falls_back_and_says_so(monkeypatch, capsys):
    from kit import backend

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "Tesla T4")
    assert backend.precision("auto") == "fp16"
    assert capsys.readouterr().out == ""
    assert backend.precision("bf16") == "fp16"
    assert "Tesla T4 has no bf16: using fp16" in capsys.readouterr().out
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert backend.precision("fp16") == "fp32"
    assert "no GPU: using fp32" in capsys.readouterr().out


def test_cpu_4bit_needs_a_bitsandbytes_with_cpu_kernels(monkeypatch):
    import importlib.metadata

    import pytest

    from kit import backend

    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.43.1")
    with pytest.raises(backend.BackendError, match="load_in_4bit=false"):
        backend.check_cpu_4bit()


def test_a_4bit_base_keeps_its_embeddings_16bit_and_trains_an_fp32_adapter():
    """kit.model.prepare_4bit_for_training: what peft's prepare_model_for_kbit_training does (frozen base, norms in
    fp32) but for the embedding tables, which stay as loaded (peft's fp32 copy was 0.87 of a 4-bit 2B's 1.89 GB,
    bench.py --memory); the 16-bit output head takes the fp32 norm's output, and the adapter learns in fp32."""
    import recipes
    from data.synthetic import generate
    from kit import families
    from kit.inputs.chat import VisionCollator
    from kit.model import load_for_training, tiny_model_dir

    recipe, _ = recipes.load("demo", ["finetune=lora", "load_in_4bit=true", "gradient_checkpointing=true"])
    model, processor = load_for_training(str(tiny_model_dir()), recipe, "hf", torch.bfloat16)
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert model.get_output_embeddings().weight.dtype == torch.bfloat16
    norms = [p for n, p in model.named_parameters() if "norm" in n]
    assert norms and all(p.dtype == torch.float32 for p in norms)
    adapter = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert adapter and all("lora_" in n and p.dtype == torch.float32 for n, p in adapter.items())

    samples = generate("train", 2, seed=3, grid=families.of_processor(processor).grid(processor), cache=None,
                       progress=False)
    batch = VisionCollator(processor, max_length=512)(samples)
    output = model.train()(**batch)
    assert output.logits.dtype == torch.bfloat16 and torch.isfinite(output.loss)
    output.loss.backward()
    assert all(adapter[n].grad is not None for n in adapter if "lora_B" in n)
    assert any(float(adapter[n].grad.abs().max()) > 0 for n in adapter if "lora_B" in n)
