"""Merge a fine-tuned run into 16-bit weights and GGUF files that llama.cpp runs, and prove that both answer alike.

    python merge.py runs/chartqa --to merged,gguf --quant q4_k_m    # -> runs/chartqa-merged/, runs/chartqa-gguf/
    python merge.py runs/demo --quant f32,f16 --force                # the tiny demo model, on the CPU
    python merge.py runs/chartqa --to gguf --out exports/chartqa     # -> exports/chartqa/gguf/ only
    python merge.py runs/chartqa --llama-cpp ~/src/llama.cpp         # your llama.cpp checkout's converter

merged/  safetensors and every processor file (AutoModelForImageTextToText / AutoProcessor load it), the run's
         run_config.json, and merge_report.json: the unmerged model against the reloaded merged one on 4 fixed
         charts (largest logit difference, identical greedy answers). A run trained on a 4-bit base (QLoRA) is
         also compared as it was trained (NF4 base + adapter, what eval.py scored) with the merged 16-bit model
         on 16 held-out rows ("as_trained"): the base's quantization error is gone from the merged model and the
         GGUF, and this says how much that changes; eval.py RUN --compare finetuned,merged,gguf scores it.
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
from dataclasses import dataclass
from pathlib import Path

import click

from kit import families, run_checks
from kit.cli import help_with_examples, user_errors
from kit.errors import UserError
from kit.export import as_trained as as_trained_run
from kit.export import gguf, gguf_export, llama, merging

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


AS_TRAINED_PROMPTS = 16  # held-out rows on which a 4-bit run as trained meets its merged model


@dataclass
class Job:
    """What merge.py was asked to do: the run, what to write where, and the llama.cpp tools for it."""
    run_dir: Path
    recipe: dict
    name: str
    adapter: bool  # a LoRA run (else a full fine-tune, already merged)
    targets: list[str]
    quants: list[str]
    folders: dict[str, Path]  # target -> its final folder
    converter: Path | None = None
    quantizer: str | None = None

    @property
    def four_bit(self) -> bool:
        """Trained on an NF4 base: the merged 16-bit model is then another model than the one trained."""
        return self.adapter and bool(self.recipe.get("load_in_4bit"))


def run(run_dir, targets, quants, out, llama_cpp_dir, dtype_name, verify, force):
    started = time.time()
    from kit.noise import silence_known_noise

    silence_known_noise()  # two library warnings that ask nothing of the user (kit/noise.py)
    job = setup(run_dir, targets, quants, out, llama_cpp_dir, verify, force)
    results = export(job, dtype_name, verify)
    save(job, results, started)


def setup(run_dir: Path, targets: str, quants: str, out, llama_cpp_dir, verify: bool, force: bool) -> Job:
    """The options checked and the tools found, before any slow work."""
    run_config = run_checks.read_run_config(run_dir)
    run_checks.check(run_dir, run_config, run_checks.run_fix(run_dir))  # before any slow work, in one line
    recipe = run_config["recipe"]
    targets = _choices(targets, ("merged", "gguf"), "--to")
    name = run_dir.resolve().name
    job = Job(run_dir, recipe, name, (run_dir / "adapter_config.json").exists(), targets,
              _choices(quants, QUANTS, "--quant") if "gguf" in targets else [],
              {t: out / t if out else run_dir.resolve().parent / f"{name}-{t}" for t in targets})
    for folder in job.folders.values():
        if folder.exists() and not force:
            raise UserError(f"{folder} already exists: add --force to replace it, or --out to write elsewhere")
    if "gguf" in targets:  # the converter, the quantizer, llama-cpp-python
        from kit.export.converter import find_converter

        job.converter = find_converter(llama_cpp_dir)
        job.quantizer = gguf.check_gguf_tools(job.quants, verify, llama_cpp_dir)
        click.echo(f"converter: {job.converter}")
    return job


def export(job: Job, dtype_name: str, verify: bool) -> dict:
    """Merge, reload and compare (with the run as trained too, for a 4-bit run); convert, quantize, prove in
    llama.cpp. What it proved, for export.json."""
    from kit.model import resolve

    recipe, system_prompt = job.recipe, job.recipe["system_prompt"]
    # first, so that the 4-bit and the 16-bit model are never in memory together
    as_trained = as_trained_run.probe(job.run_dir, recipe, AS_TRAINED_PROMPTS) if job.four_bit else None
    device, dtype, dtype_name = merging.plan_merge(
        resolve(recipe["model_name_or_path"]) if job.adapter else str(job.run_dir), dtype_name)
    what = f"{recipe['model_name_or_path']} + the LoRA adapter" if job.adapter else "the fully fine-tuned model"
    click.echo(f"loading {what} from {job.run_dir} ({dtype_name} on {device}; never 4-bit for merging)")
    model, processor = merging.load_unmerged(job.run_dir, recipe, device, dtype)
    samples, samples_from = merging.parity_samples(recipe)
    click.echo(f"parity prompts: {samples_from}")
    unmerged = [merging.probe(model, processor, sample, system_prompt) for sample in samples]
    results = {"dtype": dtype_name, "device": device, "gguf": None, "sample": samples[0],
               "chat_template": processor.chat_template}
    with merging.staged(job.folders) as staging, tempfile.TemporaryDirectory(
            prefix=".merged-scratch-", dir=next(iter(job.folders.values())).parent) as scratch:
        merged_dir = staging.get("merged", Path(scratch))
        merging.merge_and_save(model, processor, merged_dir)
        del model
        merging.release_memory()
        merged, merged_processor = merging.load_merged(merged_dir, device, dtype)
        probes = [merging.probe(merged, merged_processor, sample, system_prompt) for sample in samples]
        stop_ids = merging.stop_ids(merged)
        parity = merging.parity_report(samples, unmerged, probes, stop_ids, merged_processor.tokenizer)
        report_parity(parity, "LoRA adapter on the 16-bit base" if job.adapter else "run's model")
        results["parity"] = {"prompts": samples_from, **parity}
        if as_trained:
            results["as_trained"] = as_trained_run.compare(as_trained, merged, merged_processor, stop_ids,
                                                           system_prompt)
        if "merged" in job.targets:
            shutil.copy(job.run_dir / "run_config.json", merged_dir)
            merging.write_json(merged_dir / "merge_report.json", {
                "run_dir": str(job.run_dir), "finetune": "lora" if job.adapter else "full",
                "base": recipe["model_name_or_path"], "dtype": dtype_name, "device": device, **parity,
                **({"as_trained": results["as_trained"]} if as_trained else {})})
        if "gguf" in job.targets:  # the merged model's answers to hold llama.cpp's against, then its memory freed
            text_sample = merging.without_image(samples[0])
            references = {"image": (samples[0], probes[0]), "text": (text_sample, merging.probe(
                merged, merged_processor, text_sample, system_prompt))}
            image_token_id = merged.config.image_token_id
            del merged
            merging.release_memory()
            results["gguf"] = export_gguf(job, staging["gguf"], merged_dir, merged_processor, references,
                                          image_token_id, stop_ids, verify)
    return results


def export_gguf(job: Job, gguf_dir: Path, merged_dir: Path, processor, references: dict, image_token_id: int,
                stop_ids: set, verify: bool) -> dict:
    """The GGUF files written into `gguf_dir` and, with --verify, proven in llama.cpp against the merged model's
    `references` ({kind: (prompt, its probe)})."""
    system_prompt = job.recipe["system_prompt"]
    report = gguf_export.write_gguf(job.converter, job.quantizer, merged_dir, gguf_dir, job.folders["gguf"],
                                    job.name, job.quants, job.recipe["model_name_or_path"])
    family = families.of_model(str(merged_dir))  # config.json: a processor alone does not tell MoE from dense
    report.update(llama.image_token_limits(job.recipe, family.grid(processor)), family=family.name,
                  system_prompt=system_prompt)
    if verify:
        from importlib.metadata import version

        report.update(llama_cpp_python=version("llama_cpp_python"), verification=gguf_export.prove(
            gguf_dir, report, references, processor, stop_ids, image_token_id, system_prompt))
    shutil.copy(job.run_dir / "run_config.json", gguf_dir)
    merging.write_json(gguf_dir / "gguf_report.json", report)
    return report


def save(job: Job, results: dict, started: float):
    """The folders are in place now: say what is where and how to run it, and write RUN/export.json."""
    for target, folder in job.folders.items():
        click.echo(f"{target}: {folder}")
    report, commands = results["gguf"], {}
    if report:
        commands = llama_commands(job.folders["gguf"], report, results["sample"], job.recipe["system_prompt"],
                                  results["chat_template"])
        click.echo("run it in llama.cpp:")
        for command in commands.values():
            click.echo("  " + shlex.join(command))
    merging.write_json(job.run_dir / "export.json", {
        "run_dir": str(job.run_dir), "finetune": "lora" if job.adapter else "full", "four_bit": job.four_bit,
        "dtype": results["dtype"], "device": results["device"],
        "outputs": {target: str(folder) for target, folder in job.folders.items()},
        "parity": results["parity"], "as_trained": results.get("as_trained"),
        "gguf": {key: report[key] for key in ("models", "mmproj", "quantization", "pre_tokenizer_forced_qwen2",
                                              "verification") if key in report} if report else None,
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
