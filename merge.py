"""Merge a fine-tuned run into 16-bit weights and GGUF files that llama.cpp runs, and prove that both answer alike.

    python merge.py runs/chartqa --to merged,gguf --quant q4_k_m    # -> runs/chartqa-merged/, runs/chartqa-gguf/
    python merge.py runs/demo --quant f32,f16 --force                # the tiny demo model, on the CPU
    python merge.py runs/chartqa --to gguf --out exports/chartqa     # -> exports/chartqa/gguf/ only
    python merge.py runs/chartqa --llama-cpp ~/src/llama.cpp         # your llama.cpp checkout's converter

merged/  safetensors and every processor file (AutoModelForImageTextToText / AutoProcessor load it), the run's
         run_config.json, and merge_report.json: the unmerged model against the reloaded merged one on 4 fixed
         charts (largest logit difference, identical greedy answers).
gguf/    <run>-<quant>.gguf (arch qwen2vl) for each --quant and mmproj-<run>-f16.gguf (f32 when --quant has f32),
         written by llama.cpp's own convert_hf_to_gguf.py, with gguf_report.json: every file run in llama.cpp on a
         chart question and on the same question without the chart, its greedy tokens against the merged model's.
--out DIR puts them at DIR/merged and DIR/gguf. An existing output is replaced only with --force, and outputs
appear under their names only once complete. RUN_DIR/export.json then says what was written where, the parity
figures, every llama.cpp proof and the llama.cpp commands (the board reads it; nothing needs the printed lines).
"""

import shlex
import shutil
import tempfile
import time
from pathlib import Path

import click

from kit import families, run_checks
from kit.export import gguf, llama, merging
from kit.cli import help_with_examples, user_errors
from kit.errors import UserError

QUANTS = gguf.CONVERTER_TYPES + gguf.QUANTIZER_TYPES


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--to", "targets", default="merged,gguf",
              help="What to write, comma-separated: merged (16-bit safetensors), gguf (llama.cpp files).")
@click.option("--quant", "quants", default="f16",
              help=f"GGUF text-model types, comma-separated: {', '.join(gguf.CONVERTER_TYPES)} from the converter; "
                   f"{', '.join(gguf.QUANTIZER_TYPES)} through llama.cpp's quantizer.")
@click.option("--out", type=click.Path(path_type=Path),
              help="Folder to hold merged/ and gguf/. Default: <RUN_DIR>-merged and <RUN_DIR>-gguf beside the run.")
@click.option("--llama-cpp", "llama_cpp_dir", type=click.Path(path_type=Path),
              help="llama.cpp checkout whose convert_hf_to_gguf.py to use. Default: $LLAMA_CPP_DIR, else the kit's "
                   "cache, else llama-cpp-python's source fetched from PyPI into it.")
@click.option("--dtype", "dtype_name", type=click.Choice(["auto", "bf16", "fp16", "fp32"]), default="auto",
              help="Merged weights' precision. auto: bf16 (fp16 on older GPUs) with a GPU; on the CPU fp32 below "
                   "1B parameters, bf16 above.")
@click.option("--verify/--no-verify", default=True,
              help="Run every GGUF file in llama.cpp (llama-cpp-python) and compare its tokens with the merged model.")
@click.option("--force", is_flag=True, help="Replace existing output folders.")
def main(run_dir, targets, quants, out, llama_cpp_dir, dtype_name, verify, force):
    """Merge RUN_DIR (a train.py output) into 16-bit weights and/or GGUF."""
    with user_errors():
        run(run_dir, targets, quants, out, llama_cpp_dir, dtype_name, verify, force)


def run(run_dir, targets, quants, out, llama_cpp_dir, dtype_name, verify, force):
    started = time.time()
    from kit.noise import silence_known_noise

    silence_known_noise()  # two library warnings that ask nothing of the user (kit/noise.py)

    # --- options: what to write, where, and with which tools -------------------------------------------------
    run_config = run_checks.read_run_config(run_dir)
    run_checks.check(run_dir, run_config, run_checks.run_fix(run_dir))  # before any slow work, in one line
    recipe = run_config["recipe"]
    targets = _choices(targets, ("merged", "gguf"), "--to")
    quants = _choices(quants, QUANTS, "--quant") if "gguf" in targets else []
    name = run_dir.resolve().name
    folders = {t: out / t if out else run_dir.resolve().parent / f"{name}-{t}" for t in targets}
    for folder in folders.values():
        if folder.exists() and not force:
            raise UserError(f"{folder} already exists: add --force to replace it, or --out to write elsewhere")
    if "gguf" in targets:  # before any slow work: the converter, the quantizer, llama-cpp-python
        from kit.export.converter import find_converter

        converter = find_converter(llama_cpp_dir)
        quantizer = gguf.check_gguf_tools(quants, verify, llama_cpp_dir)
        click.echo(f"converter: {converter}")

    # --- load: the run's model with its adapter still separate, and what it says on fixed prompts ---------------
    from kit.model import resolve

    adapter = (run_dir / "adapter_config.json").exists()
    device, dtype, dtype_name = merging.plan_merge(
        resolve(recipe["model_name_or_path"]) if adapter else str(run_dir), dtype_name)
    what = f"{recipe['model_name_or_path']} + the LoRA adapter" if adapter else "the fully fine-tuned model"
    click.echo(f"loading {what} from {run_dir} ({dtype_name} on {device}; never 4-bit for merging)")
    model, processor = merging.load_unmerged(run_dir, recipe, device, dtype)
    system_prompt = recipe["system_prompt"]
    samples, samples_from = merging.parity_samples(recipe)
    click.echo(f"parity prompts: {samples_from}")
    unmerged = [merging.probe(model, processor, sample, system_prompt) for sample in samples]

    # --- run: merge, reload, compare; convert, quantize, prove in llama.cpp --------------------------------------
    with merging.staged(folders) as staging, tempfile.TemporaryDirectory(
            prefix=".merged-scratch-", dir=next(iter(folders.values())).parent) as scratch:
        merged_dir = staging.get("merged", Path(scratch))
        merging.merge_and_save(model, processor, merged_dir)
        del model
        merging.release_memory()
        merged, merged_processor = merging.load_merged(merged_dir, device, dtype)
        probes = [merging.probe(merged, merged_processor, sample, system_prompt) for sample in samples]
        stop_ids = merging.stop_ids(merged)
        parity = merging.parity_report(samples, unmerged, probes, stop_ids, merged_processor.tokenizer)
        report_parity(parity, "LoRA adapter on the base" if adapter else "run's model")
        if "merged" in targets:
            shutil.copy(run_dir / "run_config.json", merged_dir)
            merging.write_json(merged_dir / "merge_report.json", {
                "run_dir": str(run_dir), "finetune": "lora" if adapter else "full",
                "base": recipe["model_name_or_path"], "dtype": dtype_name, "device": device, **parity})
        if "gguf" in targets:
            text_sample = merging.without_image(samples[0])
            references = {"image": (samples[0], probes[0]),
                          "text": (text_sample, merging.probe(merged, merged_processor, text_sample, system_prompt))}
            image_token_id = merged.config.image_token_id
            del merged
            merging.release_memory()
            gguf_dir = staging["gguf"]
            report = write_gguf(converter, quantizer, merged_dir, gguf_dir, folders["gguf"], name, quants,
                                recipe["model_name_or_path"])
            family = families.of_model(str(merged_dir))  # config.json: a processor alone does not tell MoE from dense
            report.update(llama.image_token_limits(recipe, family.grid(merged_processor)), family=family.name,
                          system_prompt=system_prompt)
            if verify:
                from importlib.metadata import version

                report.update(llama_cpp_python=version("llama_cpp_python"), verification=prove(
                    gguf_dir, report, references, merged_processor, stop_ids, image_token_id, system_prompt))
            shutil.copy(run_dir / "run_config.json", gguf_dir)
            merging.write_json(gguf_dir / "gguf_report.json", report)

    # --- save: the folders are in place now; say what is where and how to run it ------------------------------
    for target, folder in folders.items():
        click.echo(f"{target}: {folder}")
    commands = llama_commands(folders["gguf"], report, samples[0], system_prompt,
                              merged_processor.chat_template) if "gguf" in targets else {}
    if commands:
        click.echo("run it in llama.cpp:")
        for command in commands.values():
            click.echo("  " + shlex.join(command))
    merging.write_json(run_dir / "export.json", {
        "run_dir": str(run_dir), "finetune": "lora" if adapter else "full", "dtype": dtype_name, "device": device,
        "outputs": {target: str(folder) for target, folder in folders.items()},
        "parity": {"prompts": samples_from, **parity},
        "gguf": {key: report[key] for key in ("models", "mmproj", "quantization", "pre_tokenizer_forced_qwen2",
                                              "verification") if key in report} if "gguf" in targets else None,
        "llama_cpp_commands": commands, "seconds": round(time.time() - started, 1)})
    click.echo(f"done in {time.time() - started:.0f} s")


def _choices(text: str, allowed, option: str) -> list[str]:
    chosen = [item.strip().lower() for item in text.split(",") if item.strip()]
    unknown = [item for item in chosen if item not in allowed]
    if unknown or not chosen:
        raise UserError(f"{option} {text!r}: choose from {', '.join(allowed)} (comma-separated)")
    return list(dict.fromkeys(chosen))


def report_parity(parity: dict, unmerged_name: str):
    click.echo(f"parity, {unmerged_name} vs the reloaded merged model on {parity['num_samples']} fixed charts: "
               f"max |logit difference| {parity['max_abs_logit_diff']:.2e}; identical greedy answers "
               f"{parity['identical_answers']}/{parity['num_samples']}")
    for row in parity["samples"]:
        click.echo(f"  {row['question']!r}: unmerged {row['unmerged_answer']!r}, merged {row['merged_answer']!r} "
                   f"(expected {row['expected']!r})")
    if parity["identical_answers"] < parity["num_samples"]:
        click.echo("note: some greedy answers differ; in 16-bit the merged weights are rounded once more than "
                   "base + adapter, which can flip a near-tie (see merge_report.json)")


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


def llama_commands(gguf_dir: Path, report: dict, sample: dict, system_prompt: str,
                   chat_template: str) -> dict[str, list[str]]:
    """llama-mtmd-cli asked the first parity question, and llama-server, on the first --quant's file; both run
    as printed in the pinned llama.cpp (tests/test_llama_commands.py checks every flag against its table)."""
    model = gguf_dir / next(iter(report["models"].values()))
    mmproj = gguf_dir / report["mmproj"]
    question = sample["messages"][0]["content"][-1]["text"]
    # thinking off, as trained and proven (Qwen3.5's template thinks unless told enable_thinking=false): the
    # server takes --reasoning off; llama-mtmd-cli only a template, given whole with the setting inside
    kwargs = families.by_name(report["family"]).chat_template_kwargs
    cli_extra = ("--chat-template", gguf.template_with(chat_template, kwargs)) if kwargs else ()
    server_extra = ("--reasoning", "off") if kwargs.get("enable_thinking") is False else ()
    return {"llama-mtmd-cli": gguf.llama_cli_command(model, mmproj, report, sample["images"][0], question,
                                                     system_prompt, cli_extra),
            "llama-server": ["llama-server", "-m", str(model), "--mmproj", str(mmproj), "--jinja",
                             "--image-min-tokens", str(report["image_min_tokens"]),
                             "--image-max-tokens", str(report["image_max_tokens"]), *server_extra]}


main.help = help_with_examples(main.help, __doc__)  # --help shows the examples above

if __name__ == "__main__":
    main()
