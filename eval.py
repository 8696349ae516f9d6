"""Score a fine-tuned run against its base model under the task's metric (the recipe's metric_for_best_model):
ChartQA's relaxed accuracy, exact match, ANLS, CER / WER or ROUGE-L.

    python eval.py runs/chartqa --compare base,base+prompt,finetuned
    python eval.py runs/demo --compare base,finetuned --control shuffled
    python eval.py runs/demo-qlora --compare base,finetuned --question-types count,max --out runs/demo-qlora/eval-old
    python eval.py runs/qlora --compare finetuned,merged,gguf    # as trained vs what merge.py exported
    python eval.py runs/demo --data jsonl:charts/questions.jsonl --on-bad-row skip --out runs/demo/eval-mine
    python eval.py --score questions.answers.jsonl --out runs/mine      # answers from any tool, no model loaded
    python eval.py --score runs/demo/eval/predictions.jsonl --relaxed-rule lenient --out runs/demo/eval-lenient
    python eval.py --score ocr.answers.jsonl --metric cer              # OCR answers: CER, WER, exact match
    python eval.py --score sft=runs/demo/eval/predictions.jsonl --score grpo=runs/demo-grpo/eval/predictions.jsonl
    python eval.py runs/chartqa/checkpoints/checkpoint-400 --limit 300 --compare finetuned   # as in training
    python eval.py runs/chartqa-gguf --compare finetuned --limit 500          # the GGUF pair in llama.cpp
    python eval.py Qwen/Qwen2-VL-2B-Instruct --data chartqa --compare finetuned   # any model, as `finetuned`

By default a run is scored on its held-out rows (heldout.jsonl: what it evaluated during training), else on
its dataset's test split; never silently on its training rows.

Systems: `finetuned` is the run's model with the recipe's system prompt, as it was trained; `base` is the run's
base model with only the chat template's default system message; `base+prompt` is the base model with the
recipe's system prompt (the prompt-only baseline); `merged` and `gguf` are what merge.py exported from the run
(RUN/export.json): its merged 16-bit folder and every GGUF text model as gguf:QUANT (gguf:q4_k_m for one), scored
on the same questions against `finetuned` (for a QLoRA run, its 4-bit base + adapter, as trained).
`--control shuffled` scores each system again with every question shown another test chart, which tells how much
of the score comes from looking at the chart.

The metric is the run's recipe's metric_for_best_model (what training kept its best checkpoint by and GRPO
rewards), or --metric: relaxed_accuracy (charts; with exact match), exact_match, anls (documents; with exact
match), cer / wer (OCR, LaTeX; with each other and exact match ignoring spacing), rougeL (free answers, a
text-overlap score; with exact match). Relaxed accuracy is ChartQA's reference rule (pix2struct's
relaxed_correctness; "45%" reads as 0.45) unless --relaxed-rule lenient (the kit's rule: "%" dropped). Every
number comes with a 95 % bootstrap interval, and every two systems on the same questions with a paired
comparison: counts (fixed, broken) and McNemar's exact p for right/wrong metrics, questions better / worse and
the sign test's p for the others, and the change with its paired bootstrap interval for all.

--score [LABEL=]FILE.jsonl scores answers already written (rows as `infer.py --batch` writes them, or eval.py's
own predictions.jsonl to re-score; kit/evaluate/predictions.py has the row format), once per file to compare
systems: a file's system is LABEL, else its rows' "system", else the file's name.

Writes into <RUN>/eval/ (or --out; with --score, <FILE>-eval/ beside the first file): predictions.jsonl (every
answer, right or not), report.md and report.json (every number of the tables), report.png (relaxed accuracy
with intervals), diff.jsonl and diff.html (the questions one system fixed or broke against another, with their
charts), and skipped.jsonl with --on-bad-row skip.
"""

import gc
import re
from pathlib import Path

import click

from kit.cli import help_with_examples, user_errors
from kit.errors import UserError
from kit.evaluate import exported, predictions, report, task_metrics
from kit.evaluate.questions import derangement, load_samples, shown_other, with_question_types
from kit.evaluate.scoring import METRICS as RELAXED_RULES

SYSTEMS = ("base", "base+prompt", "finetuned")


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.argument("target", type=click.Path(path_type=Path), required=False)
@click.option("--data", help="chartqa, synthetic, synthetic_text, latex_ocr, jsonl:PATH, hf:NAME or "
                             "llamafactory:DIR#NAME. "
                             "Default: the run's recipe dataset.")
@click.option("--split", help="Dataset split (ignored for jsonl). Default: the run's held-out rows (heldout.jsonl, "
                              "what it evaluated during training), else the test split; never its training rows.")
@click.option("--limit", default=0, help="Score only the first N samples (0 = all).")
@click.option("--compare", default="base,base+prompt,finetuned",
              help="Comma-separated systems to score: base, base+prompt, finetuned, and what merge.py exported: "
                   "merged, gguf (every GGUF file) or gguf:QUANT, e.g. --compare finetuned,merged,gguf.")
@click.option("--control", type=click.Choice(["none", "shuffled"]), default="none",
              help="shuffled: also score every system with each question shown another question's image.")
@click.option("--batch-size", default=8, help="Questions generated together in one call (left padding).")
@click.option("--max-new-tokens", type=int,
              help="Longest answer, in tokens. Default: the recipe's max_completion_length (32 for chart answers, "
                   "256 for latex_ocr's formulas), as training's held-out evaluation and GRPO generate.")
@click.option("--backend", type=click.Choice(["auto", "unsloth", "hf"]),
              help="Override the run's recipe backend.")
@click.option("--out", type=click.Path(path_type=Path),
              help="Output folder. Default: <TARGET>/eval; with --score, <FILE>-eval beside the first file.")
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
@click.option("--on-bad-row", type=click.Choice(["fail", "skip"]), default="fail",
              help="A row that cannot be scored (missing or unreadable image, no answer): stop (fail), or leave "
                   "it out and list it in skipped.jsonl (skip).")
@click.option("--metric", type=click.Choice(list(task_metrics.METRICS)),
              help="The metric reported first (and its companions), e.g. --metric cer for OCR. Default: the run's "
                   "recipe metric_for_best_model (relaxed_accuracy with --score).")
@click.option("--relaxed-rule", type=click.Choice(list(RELAXED_RULES)), default="chartqa",
              help="Relaxed accuracy rule. chartqa: ChartQA's reference (pix2struct; \"45%\" is 0.45), comparable "
                   "with published numbers. lenient: \"%\" dropped, so \"45%\" = \"45\".")
@click.option("--question-types", help="Synthetic data only: ask these question types instead of the run's, e.g. "
              "--question-types count,max for what the base was trained on after an adapter taught another.")
@click.option("--score", "score_files", multiple=True,
              help="Score a predictions JSONL file instead of running a model (no TARGET), e.g. "
                   "--score questions.answers.jsonl; repeat to compare systems. LABEL=FILE names the file's "
                   "system, e.g. --score sft=runs/demo/eval/predictions.jsonl "
                   "--score grpo=runs/demo-grpo/eval/predictions.jsonl (both call theirs finetuned).")
def main(target, data, split, limit, compare, control, batch_size, max_new_tokens, backend, out, force,
         on_bad_row, metric, relaxed_rule, question_types, score_files):
    """Score TARGET: a run folder made by train.py, one of its checkpoints/checkpoint-N, a merged folder, a model
    folder or hub id, or a GGUF pair (TARGET is then the `finetuned` system); or score --score FILE."""
    with user_errors():
        if score_files:
            if target is not None:
                raise UserError("give a TARGET run to evaluate, or --score FILE to score its answers, not both")
            score([predictions.score_file(spec) for spec in score_files], metric or "relaxed_accuracy", relaxed_rule,
                  out, force)
        elif target is None:
            raise UserError("give TARGET (a run folder made by train.py), or --score FILE.jsonl; see --help")
        else:
            run(target, data, split, limit, compare, control, batch_size, max_new_tokens, backend, out, force,
                on_bad_row, metric, relaxed_rule, question_types)


def score(labelled, metric, relaxed_rule, out, force):
    """Scores, intervals and diffs for answers already written by infer.py --batch, eval.py or any tool;
    `labelled`: (label or None, file) pairs."""
    labels, files = [label for label, _ in labelled], [file for _, file in labelled]
    out = out or files[0].with_name(files[0].name.removesuffix(".jsonl") + "-eval")
    check_out(out, force, files)
    rows, names = predictions.read_predictions(files, metric, relaxed_rule, labels)
    summary = report.save(out, rows, names, metric, f"Scores of {', '.join(f.name for f in files)}",
                          f"{len(rows)} questions from {', '.join(map(str, files))}", relaxed_rule=relaxed_rule)
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
        force, on_bad_row, metric=None, relaxed_rule="chartqa", question_types=None):
    from kit.noise import silence_known_noise

    silence_known_noise()  # two library warnings that ask nothing of the user (kit/noise.py)

    # --- options -----------------------------------------------------------------------------------
    kind, run_dir, weights_dir = locate_target(run_dir)
    recipe = target_recipe(run_dir, data_spec)
    # a run from before these keys: chart answers
    metric = metric or recipe.get("metric_for_best_model", "relaxed_accuracy")
    max_new_tokens = max_new_tokens or recipe.get("max_completion_length", 32)
    if question_types:  # a run's held-out rows ask its own types: the test split asks the chosen ones
        recipe, split = with_question_types(recipe, question_types, data_spec), split or "test"
    systems, deployed = exported.choose(compare, SYSTEMS, run_dir, kind)  # merged, gguf: from RUN/export.json
    if "base+prompt" in systems and not recipe["system_prompt"]:
        click.echo("note: base+prompt left out: the recipe has no system_prompt, so it would be the same as base")
        systems.remove("base+prompt")
    out = out or default_out(kind, run_dir, weights_dir)
    keep = [path / name for path in (run_dir, weights_dir) if path for name in ("run_config.json", "config.json")]
    check_out(out, force, [path for path in keep if path.exists()])  # --out RUN --force must not delete the run
    if batch_size < 1 or max_new_tokens < 1:
        raise UserError("--batch-size and --max-new-tokens must be at least 1")

    from kit import backend as backends

    backend, reason = backends.select(backend_name or recipe["backend"])
    click.echo(f"backend {backend} ({reason})")

    # --- load: samples, then one model at a time ----------------------------------------------------
    samples, skipped, split = load_samples(recipe, data_spec, split, limit, on_bad_row, run_dir)
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
                      max_new_tokens, answers, seconds, weights_dir, kind)
    for name, path in deployed.items():
        score_systems(name, [name], run_dir, recipe, backend, samples, donors, batch_size, max_new_tokens, answers,
                      seconds, path, "deployed")

    # --- save ---------------------------------------------------------------------------------------
    rows = predictions.model_rows(samples, donors, answers, metric, relaxed_rule)
    images = {str(row["id"]): sample["images"][0] for row, sample in zip(rows, samples) if sample["images"]}
    summary = report.save(out, rows, list(answers), metric, f"Evaluation of {weights_dir or run_dir}",
                          f"{len(rows)} samples from {data_spec or recipe['dataset']} ({split})", seconds, images,
                          {"skipped.jsonl": skipped} if skipped else None, relaxed_rule)
    click.echo(f"\n{report.tables(summary)}\n\nwrote {out}/predictions.jsonl, report.md, report.json, "
               "report.png, diff.jsonl, diff.html"
               + (f", skipped.jsonl ({len({s['index'] for s in skipped})} rows left out)" if skipped else ""))


def locate_target(target: Path) -> tuple[str, Path | None, Path | None]:
    """(kind, run folder or None, model to score or None = the run's own weights). Kinds: run (a run folder or
    a merged folder, both hold run_config.json), checkpoint (RUN/checkpoints/checkpoint-N), gguf (a .gguf file
    or a folder with one, mmproj-*.gguf beside it), model (a model folder, a hub id, or tiny)."""
    folder = target if target.is_dir() else target.parent
    run_config = next((f for f in (folder, folder.parent.parent) if (f / "run_config.json").exists()), None)
    if target.suffix == ".gguf" and target.is_file() or target.is_dir() and any(
            not p.name.startswith("mmproj-") for p in target.glob("*.gguf")):
        return "gguf", run_config if run_config == folder else None, target
    if (target / "run_config.json").exists():
        return "run", target, None
    if run_config and target.name.startswith("checkpoint-"):
        return "checkpoint", run_config, target
    if (target / "config.json").exists() or str(target) == "tiny" or (
            not target.exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", str(target)) and not target.parent.is_dir()):
        return "model", None, target
    raise UserError(f"{target}: not a run folder (run_config.json), a checkpoint, a merged or model folder "
                    "(config.json), a .gguf pair, or a hub id")


def target_recipe(run_dir: Path | None, data_spec: str | None) -> dict:
    """The run's recipe; for a model or GGUF with no run, the recipe named like --data (latex_ocr), else chartqa
    (pixel limits, system prompt and dataset)."""
    if run_dir:
        from kit.run_checks import read_run_config

        return read_run_config(run_dir)["recipe"]
    import recipes

    name = data_spec if data_spec in recipes.names() else "chartqa"
    click.echo(f"no run folder: recipe {name}'s pixel limits and system prompt apply")
    return recipes.load(name)[0]


def default_out(kind: str, run_dir: Path | None, weights_dir: Path | None) -> Path:
    if kind == "model" and not (weights_dir / "config.json").exists():  # a hub id or tiny: no folder of ours
        return Path("runs") / f"eval-{str(weights_dir).replace('/', '--')}"
    if kind == "gguf":
        return (weights_dir if weights_dir.is_dir() else weights_dir.parent) / "eval"
    return (weights_dir or run_dir) / "eval"


def score_systems(model_kind, systems, run_dir, recipe, backend, samples, donors, batch_size, max_new_tokens,
                  answers, seconds, weights_dir=None, target_kind="run"):
    """Load one model (the base or the run's) and fill `answers` / `seconds` for each of its systems."""
    import torch
    from tqdm import tqdm

    from kit import backend as backends
    from kit import model as models
    from kit.evaluate.generate import generate_answers, prepare_for_inference
    from kit.inputs import chat

    if model_kind == "finetuned" and target_kind == "gguf" or model_kind.startswith("gguf:"):
        score_gguf(weights_dir, recipe, samples, donors, max_new_tokens, answers, seconds, model_kind)
        return
    dtype = backends.torch_dtype(backends.precision())
    if model_kind == "finetuned" and target_kind == "model" or model_kind == "merged":
        model, processor = models.load_base(models.resolve(str(weights_dir)), backend, False, dtype,
                                            gradient_checkpointing=False)
    elif model_kind == "finetuned":
        model, processor, _ = models.load_run(run_dir, backend, dtype, weights_dir=weights_dir)
    else:
        model, processor = models.load_base(models.resolve(recipe["model_name_or_path"]), backend,
                                            recipe["load_in_4bit"], dtype, gradient_checkpointing=False,
                                            dynamic_4bit=recipe.get("unsloth_dynamic_4bit", False))  # as trained
    prepare_for_inference(model, backend)
    chat.set_limits(processor, recipe)
    shuffled = [shown_other(sample, samples[donor]) for sample, donor in zip(samples, donors)] \
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


def score_gguf(path, recipe, samples, donors, max_new_tokens, answers, seconds, system="finetuned"):
    """The GGUF pair as `system`, one question at a time in llama.cpp (greedy)."""
    from tqdm import tqdm

    from kit.export.llama import gguf_answers

    shuffled = [shown_other(sample, samples[donor]) for sample, donor in zip(samples, donors)] \
        if donors is not None else None
    for name, batch in [(system, samples)] + ([(f"{system} (shuffled)", shuffled)] if shuffled else []):
        with tqdm(total=len(batch), desc=name if name.startswith("gguf") else f"{name} (gguf)", mininterval=2) as bar:
            answers[name], spent = gguf_answers(path, recipe, batch, recipe["system_prompt"], max_new_tokens,
                                                bar.update)
        seconds[name] = spent / len(batch)


main.help = help_with_examples(main.help, __doc__)  # --help shows the examples above

if __name__ == "__main__":
    main()
