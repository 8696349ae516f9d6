"""A QLoRA run as it was trained (its NF4 base + the adapter) against its merged 16-bit model.

The merged model and every GGUF made from it carry the 16-bit base, not the 4-bit one the adapter was trained
on and eval.py scored: merge.py measures how far apart the two are on rows the run never trained on (identical
greedy answers, largest logit difference), and eval.py --compare finetuned,merged,gguf scores what it costs.
"""

from pathlib import Path

import click

from kit.export import merging


def probe(run_dir: Path, recipe: dict, count: int) -> dict:
    """The run as it was trained and as eval.py scores it (its 4-bit base + the adapter) on up to `count`
    held-out rows: {"samples", "prompts" (where they come from), "probes"}."""
    from kit import backend as backends
    from kit import model as models
    from kit.evaluate.generate import prepare_for_inference

    samples, source = merging.heldout_prompts(run_dir, recipe, count)
    backend, _ = backends.select(recipe["backend"])
    click.echo(f"loading the run as trained ({recipe['model_name_or_path']} in 4-bit + the LoRA adapter, "
               f"{backend}) for {source}")
    model, processor, _ = models.load_run(run_dir, backend, backends.torch_dtype(backends.precision()))
    prepare_for_inference(model, backend)
    probes = [merging.probe(model, processor, sample, recipe["system_prompt"]) for sample in samples]
    del model
    merging.release_memory()
    return {"samples": samples, "prompts": source, "probes": probes}


def compare(as_trained: dict, merged, processor, stop_ids: set, system_prompt: str) -> dict:
    """The merged 16-bit model against the run as trained, on the same held-out rows: what deploying changes."""
    samples = as_trained["samples"]
    probes = [merging.probe(merged, processor, sample, system_prompt) for sample in samples]
    compared = merging.parity_report(samples, as_trained["probes"], probes, stop_ids, processor.tokenizer,
                                     before_name="as_trained")
    click.echo(f"as trained (4-bit base + adapter) vs the merged 16-bit model on {as_trained['prompts']}: "
               f"identical greedy answers {compared['identical_answers']}/{compared['num_samples']}; "
               f"max |logit difference| {compared['max_abs_logit_diff']:.2e}")
    if compared["identical_answers"] < compared["num_samples"]:
        click.echo("note: the merged model has the 16-bit base, not the NF4 one trained on: where answers differ, "
                   "`python eval.py RUN --compare finetuned,merged,gguf` scores what that costs")
    return {"prompts": as_trained["prompts"], **compared}
