"""merge.py on the tiny model: merged weights that reload and answer like the adapter, GGUF files that llama.cpp
runs with the same tokens, and the errors a user meets (no converter offline, an existing output)."""

import json
import sys

import pytest
from click.testing import CliRunner

from kit.export import converter, gguf


@pytest.fixture(scope="module")
def llama_cpp_dir():
    """The converter, found (or fetched into the cache) once, then handed to merge.py as LLAMA_CPP_DIR."""
    with pytest.MonkeyPatch.context() as patch:
        folder = converter.find_converter().parent
        patch.setenv("LLAMA_CPP_DIR", str(folder))
        yield folder


def merge_cli(*args):
    import merge

    return CliRunner().invoke(merge.main, [str(a) for a in args], catch_exceptions=False)


def greedy(model, processor, sample, system_prompt):
    import torch

    from kit.inputs import chat

    inputs = chat.generation_inputs(processor, [sample], system_prompt)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    return output[0, inputs["input_ids"].shape[1]:].tolist()


@pytest.mark.slow
def test_merged_lora_reloads_and_answers_like_the_adapter(lora_run):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from data.synthetic import generate
    from kit.model import resolve

    result = merge_cli(lora_run, "--to", "merged")
    assert result.exit_code == 0, result.output
    merged_dir = lora_run.parent / f"{lora_run.name}-merged"  # the default place, beside the run
    report = json.loads((merged_dir / "merge_report.json").read_text())
    assert report["finetune"] == "lora"
    assert report["identical_answers"] == report["num_samples"] > 0
    assert report["max_abs_logit_diff"] < 1e-4  # fp32 on the CPU: only summation order differs
    assert "identical greedy answers" in result.output
    # trained on a 4-bit base: the run as trained (NF4 + adapter) against the merged 16-bit model, on test charts
    export = json.loads((lora_run / "export.json").read_text())
    as_trained = export["as_trained"]
    assert export["four_bit"] and report["as_trained"] == as_trained
    assert as_trained["num_samples"] == 16 and "synthetic test charts" in as_trained["prompts"]
    assert 0 <= as_trained["identical_answers"] <= 16
    assert as_trained["identical_answers"] == sum(row["identical_answer"] for row in as_trained["samples"])
    # the NF4 base's rounding is gone from the merged model: were the two the same model, this would be ~1e-6
    assert 1e-3 < as_trained["max_abs_logit_diff"] < 10
    assert "as trained (4-bit base + adapter) vs the merged 16-bit model" in result.output

    # Independently: the merged folder through the ordinary loaders against base + adapter, on charts the
    # report did not use.
    recipe = json.loads((lora_run / "run_config.json").read_text())["recipe"]
    merged = AutoModelForImageTextToText.from_pretrained(merged_dir, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(merged_dir)
    base = AutoModelForImageTextToText.from_pretrained(resolve(recipe["model_name_or_path"]), dtype=torch.float32)
    q_proj = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged.state_dict()[q_proj], base.state_dict()[q_proj]), "the adapter was not merged"
    adapted = PeftModel.from_pretrained(base, str(lora_run)).eval()
    samples = generate("test", report["num_samples"] + 2, seed=recipe["synthetic_seed"],
                       chart_types=recipe["synthetic_chart_types"], question_types=recipe["synthetic_question_types"],
                       layout=recipe["synthetic_layout"], size=recipe["synthetic_size"],
                       grid=recipe["synthetic_grid"], progress=False)
    for sample in samples[report["num_samples"]:]:
        assert greedy(merged, processor, sample, recipe["system_prompt"]) == \
            greedy(adapted, processor, sample, recipe["system_prompt"])


def gguf_value(reader, key):
    return reader.fields[key].contents()


@pytest.mark.slow
def test_gguf_of_the_tiny_model_has_qwen2vl_metadata_and_runs_in_llama_cpp(full_run, tmp_path, llama_cpp_dir):
    from gguf import GGUFReader
    from safetensors import safe_open

    result = merge_cli(full_run, "--to", "merged,gguf", "--quant", "f32,f16,q4_k_m", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    gguf_dir, merged_dir = tmp_path / "gguf", tmp_path / "merged"
    report = json.loads((gguf_dir / "gguf_report.json").read_text())
    assert set(report["models"]) == {"f32", "f16", "q4_k_m"}
    assert report["models"]["f32"] == f"{full_run.name}-f32.gguf"
    assert report["mmproj"].startswith(f"mmproj-{full_run.name}-")

    text = GGUFReader(gguf_dir / report["models"]["f32"])
    config = json.loads((merged_dir / "config.json").read_text())
    sections = config["text_config"]["rope_parameters"]["mrope_section"]
    assert gguf_value(text, "general.architecture") == "qwen2vl"
    assert gguf_value(text, "qwen2vl.rope.dimension_sections") == (sections + [0] * 4)[:4]  # llama.cpp pads to 4
    with safe_open(merged_dir / "model.safetensors", "pt") as weights:
        hf_text_tensors = [k for k in weights.keys()  # noqa: SIM118  (a safetensors handle does not iterate)
                           if not k.startswith(("visual.", "model.visual."))]
    assert len(text.tensors) == len(hf_text_tensors)
    mmproj = GGUFReader(gguf_dir / report["mmproj"])
    assert gguf_value(mmproj, "clip.projector_type") == "qwen2vl_merger"
    assert len(mmproj.tensors) > 0

    # The tiny tokenizer is unknown to the converter and splits with Qwen2's regex: forced to qwen2, and said so.
    assert report["pre_tokenizer_forced_qwen2"] and gguf.FORCED_PRE_NOTE in result.output
    assert gguf_value(text, "tokenizer.ggml.pre") == "qwen2"

    # Run in llama.cpp: at f32 the same prompt tokens and the same greedy tokens as the merged HF model.
    proof = report["verification"]
    for kind in ("image", "text"):
        f32 = proof["f32"][kind]
        assert f32["prompt_identical"], f32
        assert f32["agree"] and f32["llama_cpp_tokens"] == f32["hf_tokens"], f32
        assert f32["max_abs_logit_diff"] < 1e-2  # kernels sum in another order; weights are the same floats
        for quant in ("f16", "q4_k_m"):  # reported either way, never hidden
            assert proof[quant][kind]["agree"] == (proof[quant][kind]["first_divergence"] is None)

    # The tiny model's rows (64) are too short for K-quants: the fallback is reported, not passed off as Q4_K_M.
    q4 = report["quantization"]["q4_k_m"]
    assert q4["not_k_quant"] == q4["weight_matrices"] > 0
    assert "not a true Q4_K_M" in q4["note"] and q4["note"] in result.output

    assert f"llama-mtmd-cli -m {gguf_dir / report['models']['f32']} --mmproj {gguf_dir / report['mmproj']}" \
        in result.output
    assert f"llama-server -m {gguf_dir / report['models']['f32']}" in result.output


def test_pre_tokenizer_is_forced_only_for_qwen2_regex(full_run, tmp_path):
    from kit.families._tiny import QWEN2_PRETOKENIZE_REGEX

    assert gguf.uses_regex(full_run, QWEN2_PRETOKENIZE_REGEX)
    tokenizer = json.loads((full_run / "tokenizer.json").read_text())
    tokenizer["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\s+|\w+"
    (tmp_path / "tokenizer.json").write_text(json.dumps(tokenizer))
    assert not gguf.uses_regex(tmp_path, QWEN2_PRETOKENIZE_REGEX)


def test_no_converter_offline_names_the_three_ways(full_run, tmp_path, monkeypatch):
    monkeypatch.delenv("LLAMA_CPP_DIR", raising=False)
    monkeypatch.setenv("QWEN2VL_KIT_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(converter, "sdist_download_command",
                        lambda dest: [sys.executable, "-c", "import sys; sys.exit('simulated: no network')"])
    result = merge_cli(full_run, "--to", "gguf", "--out", tmp_path / "out")
    assert result.exit_code == 2
    message = result.output.strip().splitlines()[-1]
    assert message.startswith("error: no llama.cpp converter")
    for way in ("--llama-cpp DIR", "LLAMA_CPP_DIR", str(converter.converter_cache()), "PyPI", "simulated: no network"):
        assert way in message
    assert not (tmp_path / "out").exists()

    result = merge_cli(full_run, "--to", "gguf", "--llama-cpp", tmp_path)
    assert result.exit_code == 2 and f"{tmp_path} has no convert_hf_to_gguf.py" in result.output


def test_existing_output_is_refused_without_force_and_left_intact(full_run, tmp_path):
    merged_dir = tmp_path / "merged"
    merged_dir.mkdir()
    (merged_dir / "notes.txt").write_text("earlier work")

    result = merge_cli(full_run, "--to", "merged", "--out", tmp_path)
    assert result.exit_code == 2
    assert f"{merged_dir} already exists" in result.output and "--force" in result.output
    assert (merged_dir / "notes.txt").read_text() == "earlier work"
    assert sorted(tmp_path.iterdir()) == [merged_dir]  # nothing half-written beside it

    result = merge_cli(full_run, "--to", "merged", "--out", tmp_path, "--force")
    assert result.exit_code == 0, result.output
    assert not (merged_dir / "notes.txt").exists() and (merged_dir / "merge_report.json").exists()
    assert sorted(tmp_path.iterdir()) == [merged_dir]
