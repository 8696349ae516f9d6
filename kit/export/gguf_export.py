"""GGUF files from a merged folder through llama.cpp's own converter and quantizer, and their proof in llama.cpp:
each text model with the vision projector on a chart question and on the same question without the chart, its
greedy tokens against the merged model's (merge.py prints the lines and writes gguf_report.json)."""

import time
from pathlib import Path

import click

from kit import families
from kit.export import gguf, llama, merging


def write_gguf(converter, quantizer, merged_dir: Path, gguf_dir: Path, final_dir: Path, name: str,
               quants: list[str], base: str) -> dict:
    """The text model in every --quant and the vision projector, written into `gguf_dir` (renamed to `final_dir`)."""
    logs = gguf_dir / "logs"
    logs.mkdir()
    metadata = logs / "metadata.json"  # the run's name, not the temporary folder's, in general.name/finetune
    merging.write_json(metadata, gguf.gguf_metadata(name, base))
    report = {"name": name, "converter": str(converter), "models": {}, "quantization": {},
              "pre_tokenizer_forced_qwen2": False}

    def convert(filename: str, outtype: str, mmproj: bool = False) -> Path:
        path, started = gguf_dir / filename, time.time()
        forced = gguf.convert(converter, merged_dir, path, outtype, name, mmproj, logs / f"convert-{path.stem}.log",
                                metadata)
        if forced and not report["pre_tokenizer_forced_qwen2"]:
            click.echo(f"note: {gguf.forced_pre_note(families.of_model(str(merged_dir)).llama.pre_tokenizer)}")
        report["pre_tokenizer_forced_qwen2"] |= forced
        wrote(path, started)
        return path

    def wrote(path: Path, started: float):
        where = final_dir / path.name if path.parent == gguf_dir else "the quantizer's input, removed at the end"
        click.echo(f"wrote {where} ({path.stat().st_size / 1e6:,.1f} MB, {time.time() - started:.1f} s)")

    for quant in quants:
        if quant in gguf.CONVERTER_TYPES:
            report["models"][quant] = convert(f"{name}-{quant}.gguf", quant).name
    quantizer_input = gguf_dir / f"{name}-f16.gguf" if "f16" in quants else logs / f"{name}-f16.gguf"
    for quant in (q for q in quants if q in gguf.QUANTIZER_TYPES):
        if not quantizer_input.exists():
            convert(str(quantizer_input.relative_to(gguf_dir)), "f16")
        path, started = gguf_dir / f"{name}-{quant}.gguf", time.time()
        gguf.quantize(quantizer, quantizer_input, path, quant, logs / f"quantize-{path.stem}.log")
        wrote(path, started)
        types = gguf.tensor_types(path)
        note = gguf.k_quant_note(quant, types)
        if note:
            click.echo(f"note: {note}")
        report["quantization"][quant] = {"quantizer": quantizer, **types, "note": note}
        report["models"][quant] = path.name
    if quantizer_input.parent == logs:
        quantizer_input.unlink(missing_ok=True)
    report["models"] = {quant: report["models"][quant] for quant in quants}  # --quant's order: the first is shown
    # The vision tower is small: f16 as usual, f32 beside an f32 text model so that one can be compared exactly.
    mmproj_type = "f32" if "f32" in quants else "f16"
    report["mmproj"] = convert(f"mmproj-{name}-{mmproj_type}.gguf", mmproj_type, mmproj=True).name
    return report


def prove(gguf_dir: Path, report: dict, references: dict, processor, stop_ids: set, image_token_id: int,
          system_prompt: str) -> dict:
    """Each GGUF text model with the mmproj in llama.cpp, on the chat text the merged model saw."""
    results = {}
    for quant, filename in report["models"].items():
        pair = llama.LlamaCppPair(gguf_dir / filename, gguf_dir / report["mmproj"], report["image_min_tokens"],
                                   report["image_max_tokens"], family=families.by_name(report["family"]))
        try:
            results[quant] = {}
            for kind, (sample, hf) in references.items():
                text = merging.chat_text(processor, sample, system_prompt)
                ours = pair.run(text, sample["images"][0] if sample["images"] else None, len(hf["answer_ids"]))
                result = merging.compare_runs(hf, ours, image_token_id, stop_ids, processor.tokenizer)
                results[quant][kind] = {"question": sample["messages"][0]["content"][-1]["text"], **result}
                click.echo(f"llama.cpp {filename}, {kind} prompt: {describe(result)}")
        finally:
            pair.close()
    return results


def describe(result: dict) -> str:
    if result["prompt_identical"]:
        prompt = f"same {result['prompt_tokens']} prompt tokens, max |logit diff| {result['max_abs_logit_diff']:.1e}"
    else:
        prompt = "PROMPT TOKENS DIFFER from the merged model's"
    answer = f"answer {result['llama_cpp_answer']!r}"
    count = len(result["hf_tokens"])
    if result["agree"]:
        return f"{prompt}; {answer}, greedy tokens {count}/{count} the merged model's"
    at = result["first_divergence"]
    return (f"{prompt}; {answer} vs merged {result['hf_answer']!r}: greedy tokens part at {at} of {count} "
            f"(llama.cpp {result['llama_cpp_tokens'][at]}, merged model {result['hf_tokens'][at]})")
