"""Score a fine-tuned run against its base model on chart questions (ChartQA's relaxed accuracy, exact match).

    python eval.py runs/chartqa --compare base,base+prompt,finetuned
    python eval.py runs/demo --compare base,finetuned --control shuffled
    python eval.py runs/demo --data jsonl:charts/questions.jsonl --on-bad-row skip --out runs/demo/eval-mine
    python eval.py --score questions.answers.jsonl --out runs/mine      # answers from any tool, no model loaded
    python eval.py --score runs/demo/eval/predictions.jsonl --metric lenient --out runs/demo/eval-lenient

Systems: `finetuned` is the run's model with the recipe's system prompt, as it was trained; `base` is the run's
base model with only the chat template's default system message; `base+prompt` is the base model with the
recipe's system prompt (the prompt-only baseline). `--control shuffled` scores each system again with every
question shown another test chart, which tells how much of the score comes from looking at the chart.

Relaxed accuracy is ChartQA's reference rule (pix2struct's relaxed_correctness; "45%" reads as 0.45) unless
--metric lenient (the kit's rule: "%" dropped). Every accuracy comes with a 95 % bootstrap interval, and every
two systems on the same questions with their paired counts (fixed, broken) and McNemar's exact p-value.

--score FILE.jsonl scores answers that are already there: rows {"prediction", "answer" or "answers" (or
"messages" with the reference as assistant turn), optional "system", "id", "question", "image", "subset",
"qtype"}, as `infer.py --batch` writes them, or eval.py's own predictions.jsonl (to re-score under another
--metric). Give --score once per file to compare systems; a file's rows without "system" are named after it.

Writes into <RUN>/eval/ (or --out; with --score, <FILE>-eval/ beside the first file): predictions.jsonl (every
answer, right or not), report.md and report.json (every number of the tables), report.png (relaxed accuracy
with intervals), diff.jsonl and diff.html (the questions one system fixed or broke against another, with their
charts), and skipped.jsonl with --on-bad-row skip.
"""

import gc
import json
import random
from pathlib import Path

import click

from kit import report
from kit.errors import UserError, user_errors
from kit.metrics import METRICS, exact_correct, relaxed_correct

SYSTEMS = ("base", "base+prompt", "finetuned")


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.argument("target", type=click.Path(path_type=Path), required=False)
@click.option("--data", help="chartqa, synthetic, latex_ocr or jsonl:PATH. Default: the run's recipe dataset.")
@click.option("--split", default="test", help="Dataset split (ignored for jsonl).")
@click.option("--limit", default=0, help="Score only the first N samples (0 = all).")
@click.option("--compare", default="base,base+prompt,finetuned", help="Comma-separated systems to score.")
@click.option("--control", type=click.Choice(["none", "shuffled"]), default="none",
              help="shuffled: also score every system with each question shown another chart's image.")
@click.option("--batch-size", default=8, help="Questions generated together in one call (left padding).")
@click.option("--max-new-tokens", default=32, help="Longest answer, in tokens (chart answers are short).")
@click.option("--backend", type=click.Choice(["auto", "unsloth", "hf"]),
              help="Override the run's recipe backend.")
@click.option("--out", type=click.Path(path_type=Path),
              help="Output folder. Default: <TARGET>/eval; with --score, <FILE>-eval beside the first file.")
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
@click.option("--on-bad-row", type=click.Choice(["fail", "skip"]), default="fail",
              help="A row that cannot be scored (missing or unreadable image, no answer): stop (fail), or leave "
                   "it out and list it in skipped.jsonl (skip).")
@click.option("--metric", type=click.Choice(list(METRICS)), default="chartqa",
              help="Relaxed accuracy rule. chartqa: ChartQA's reference (pix2struct; \"45%\" is 0.45), comparable "
                   "with published numbers. lenient: the kit's earlier rule (\"%\" dropped, so \"45%\" = \"45\").")
@click.option("--score", "score_files", multiple=True, type=click.Path(path_type=Path),
              help="Score a predictions JSONL file instead of running a model (no TARGET), e.g. "
                   "--score questions.answers.jsonl; repeat to compare systems.")
def main(target, data, split, limit, compare, control, batch_size, max_new_tokens, backend, out, force,
         on_bad_row, metric, score_files):
    """Score TARGET (a run folder made by train.py), or --score FILE; see the module docstring for examples."""
    with user_errors():
        if score_files:
            if target is not None:
                raise UserError("give a TARGET run to evaluate, or --score FILE to score its answers, not both")
            score(list(score_files), metric, out, force)
        elif target is None:
            raise UserError("give TARGET (a run folder made by train.py), or --score FILE.jsonl; see --help")
        else:
            run(target, data, split, limit, compare, control, batch_size, max_new_tokens, backend, out, force,
                on_bad_row, metric)


def score(files, metric, out, force):
    """Scores, intervals and diffs for answers already written by infer.py --batch, eval.py or any tool."""
    out = out or files[0].with_name(files[0].name.removesuffix(".jsonl") + "-eval")
    check_out(out, force, files)
    rows, names = report.read_predictions(files, metric)
    summary = report.save(out, rows, names, metric, f"Scores of {', '.join(f.name for f in files)}",
                          f"{len(rows)} questions from {', '.join(map(str, files))}")
    click.echo(f"\n{report.tables(summary)}\n\nwrote {out}/predictions.jsonl, report.md, report.json, report.png, "
               "diff.jsonl, diff.html")


def check_out(out: Path, force: bool, inputs=()):
    """`out` may be written: empty, or replaced with --force, and never a folder holding one of `inputs`."""
    if any(out.resolve() in path.resolve().parents for path in inputs):
        raise UserError(f"--out {out} holds {', '.join(map(str, inputs))}, which it would replace; choose another "
                        "--out")
    if out.exists() and any(out.iterdir()) and not force:
        raise UserError(f"{out} already holds an evaluation; use --force to replace it or --out for another folder")


def run(run_dir, data_spec, split, limit, compare, control, batch_size, max_new_tokens, backend_name, out,
        force, on_bad_row, metric="chartqa"):
    # --- options -----------------------------------------------------------------------------------
    if not (run_dir / "run_config.json").exists():
        raise UserError(f"{run_dir} is not a run folder (no run_config.json); eval.py scores runs made by train.py")
    recipe = json.loads((run_dir / "run_config.json").read_text())["recipe"]
    systems = [name.strip() for name in compare.split(",") if name.strip()]
    unknown = [name for name in systems if name not in SYSTEMS]
    if unknown or not systems:
        raise UserError(f"--compare {compare}: choose from {', '.join(SYSTEMS)}")
    if "base+prompt" in systems and not recipe["system_prompt"]:
        click.echo("note: base+prompt left out: the recipe has no system_prompt, so it would be the same as base")
        systems.remove("base+prompt")
    out = out or run_dir / "eval"
    check_out(out, force, [run_dir / "run_config.json"])  # --out runs --force must not delete the run
    if batch_size < 1 or max_new_tokens < 1:
        raise UserError("--batch-size and --max-new-tokens must be at least 1")

    from kit import backend as backends

    backend, reason = backends.select(backend_name or recipe["backend"])
    click.echo(f"backend {backend} ({reason})")

    # --- load: samples, then one model at a time ----------------------------------------------------
    samples, skipped = load_samples(recipe, data_spec, split, limit, on_bad_row)
    donors = derangement(len(samples)) if control == "shuffled" else None
    if donors is not None and len(samples) < 2:
        raise UserError("--control shuffled needs at least 2 samples")
    click.echo(f"data: {len(samples)} samples from {data_spec or recipe['dataset']} ({split})")
    answers, seconds = {}, {}
    on_base = [name for name in systems if name != "finetuned"]
    if on_base:
        score_systems("base", on_base, run_dir, recipe, backend, samples, donors, batch_size, max_new_tokens,
                      answers, seconds)
    if "finetuned" in systems:
        score_systems("finetuned", ["finetuned"], run_dir, recipe, backend, samples, donors, batch_size,
                      max_new_tokens, answers, seconds)

    # --- save ---------------------------------------------------------------------------------------
    rows = prediction_rows(samples, donors, answers, metric)
    images = {str(row["id"]): sample["images"][0] for row, sample in zip(rows, samples) if sample["images"]}
    summary = report.save(out, rows, list(answers), metric, f"Evaluation of {run_dir}",
                          f"{len(rows)} samples from {data_spec or recipe['dataset']} ({split})", seconds, images,
                          {"skipped.jsonl": skipped} if skipped else None)
    click.echo(f"\n{report.tables(summary)}\n\nwrote {out}/predictions.jsonl, report.md, report.json, "
               "report.png, diff.jsonl, diff.html"
               + (f", skipped.jsonl ({len({s['index'] for s in skipped})} rows left out)" if skipped else ""))


def load_samples(recipe, data_spec, split, limit, on_bad_row):
    """(usable samples, skipped rows): every row checked (image opens, answer present) before any model loads."""
    import data
    from data.lint import lint, skipped_rows, split_bad_rows

    spec = data_spec or recipe["dataset"]
    if spec not in ("chartqa", "synthetic", "latex_ocr") and not spec.startswith("jsonl:"):
        raise UserError(f"--data {spec}: choose chartqa, synthetic, latex_ocr or jsonl:PATH")
    eval_recipe = {**recipe, "dataset": spec, "limit": limit}
    if spec == "synthetic" and limit:
        eval_recipe["synthetic_num_test"] = limit  # test charts are drawn from their own index range
    try:
        samples = data.load(eval_recipe, split)
    except ConnectionError as error:
        raise UserError(f"--data {spec}: could not fetch it ({error}); check the network or use jsonl:PATH")
    findings = lint(samples, duplicates=False)  # only rows that cannot be scored
    usable = split_bad_rows(samples, findings, on_bad_row)
    if not usable:
        raise UserError(f"--data {spec}: no row can be scored")
    return usable, skipped_rows(samples, findings)


def derangement(n: int, seed: int = 0) -> list[int]:
    """donor[i] != i for every i: one random cycle through all samples (Sattolo's shuffle), fixed by `seed`."""
    donors = list(range(n))
    rng = random.Random(seed)
    for i in range(n - 1, 0, -1):
        j = rng.randrange(i)
        donors[i], donors[j] = donors[j], donors[i]
    return donors


def score_systems(model_kind, systems, run_dir, recipe, backend, samples, donors, batch_size, max_new_tokens,
                  answers, seconds):
    """Load one model (the base or the run's) and fill `answers` / `seconds` for each of its systems."""
    import torch
    from tqdm import tqdm

    from kit import backend as backends, chat, model as models
    from kit.generate import generate_answers, prepare_for_inference

    dtype = backends.torch_dtype(backends.precision())
    if model_kind == "finetuned":
        model, processor, _ = models.load_run(run_dir, backend, dtype)
    else:
        model, processor = models.load_base(models.resolve(recipe["model_name_or_path"]), backend,
                                            recipe["load_in_4bit"], dtype,
                                            gradient_checkpointing=False)
    prepare_for_inference(model, backend)
    chat.set_pixels(processor, recipe["min_pixels"], recipe["max_pixels"])
    shuffled = [{**sample, "images": samples[donor]["images"]} for sample, donor in zip(samples, donors)] \
        if donors is not None else None
    for system in systems:
        system_prompt = "" if system == "base" else recipe["system_prompt"]
        passes = [(system, samples)] + ([(f"{system} (shuffled)", shuffled)] if shuffled else [])
        for name, batch in passes:
            with tqdm(total=len(batch), desc=name, mininterval=2) as bar:
                answers[name], spent = generate_answers(model, processor, batch, system_prompt, max_new_tokens,
                                                        batch_size, progress=bar.update)
            seconds[name] = spent / len(batch)
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def question_of(sample: dict) -> str:
    user = [m for m in sample["messages"] if m["role"] == "user"][-1]
    content = user["content"] if isinstance(user["content"], list) else [{"type": "text", "text": user["content"]}]
    return " ".join(part["text"] for part in content if part.get("type") == "text")


def prediction_rows(samples, donors, answers, metric="chartqa") -> list[dict]:
    rows = []
    for i, sample in enumerate(samples):
        row = {"id": sample["id"], "image": _path_or_none(sample["images"]), "question": question_of(sample),
               "references": sample["answers"]}
        for key in report.GROUPS:
            if key in sample:
                row[key] = sample[key]
        if donors is not None:
            row["shuffled_image"] = _path_or_none(samples[donors[i]]["images"])
        row["systems"] = {name: {"answer": given[i], "relaxed": relaxed_correct(given[i], sample["answers"], metric),
                                 "exact": exact_correct(given[i], sample["answers"])}
                          for name, given in answers.items()}
        rows.append(row)
    return rows


def _path_or_none(images: list):
    return str(images[0]) if images and isinstance(images[0], (str, Path)) else None


if __name__ == "__main__":
    main()
