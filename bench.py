"""Training speed and memory, backend against backend, on the real Qwen2-VL shapes (or the tiny model on a CPU).

    python bench.py --recipe chartqa --model random:qwen2-vl-7b --backends unsloth,hf       # on a GPU
    python bench.py --recipe kaggle_t4 --model random:qwen2-vl-7b --backends unsloth --memory-cap 16GB
    python bench.py --recipe demo --backends hf --steps 30                                   # CPU, tiny model
    python bench.py --recipe chartqa --model tiny --backends hf --packing --data hf:runs/charts/chartqa-400-varied
    python bench.py --recipe demo --backends hf --memory --steps 2 --set finetune=lora   # CPU: plan vs host memory

Each backend runs in its own process (unsloth patches transformers for the whole process) with the same
recipe: batch, sequence lengths, LoRA targets, precision, synthetic charts at ChartQA size and the recipe's
max_pixels. After warm-up steps, N timed steps report samples/s, tokens/s, ms/step, peak allocated and
reserved memory, model FLOPs utilisation, and the share of step time spent loading and collating data.
Results are printed as a markdown table and saved as JSON; --markdown appends the table to a file.

--packing runs the first backend twice, padded and packed (packing=false / true), on the same samples in
the same seeded order and the same steps, and ends with the padding share and tokens/s of each and their
ratio. --memory (a CPU machine) runs the first backend twice, base in 4-bit and in 16-bit, and prints the host
memory of each part (base weights, adapter + gradients + optimizer, activations + logits) beside train.py --plan's
estimate for the same sample, batch and bf16 (BENCHMARKS.md, "QLoRA memory", has it for the 2B shapes).
--data takes a dataset spec (hf:FOLDER, jsonl:FILE, ...) instead of the synthetic charts, e.g. the
ChartQA-shaped parquet that `python bench_data.py --build-only --varied-sizes` writes.
"""

import json
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import click

from kit.cli import help_with_examples
from kit.errors import UserError

# Dense bf16 peak of the cards we report on (vendor datasheets), for model FLOPs utilisation.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "T4": 65.0, "RTX 4090": 165.0,
               "RTX 3090": 71.0, "A10": 125.0}


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--recipe", default="chartqa", help="Recipe whose batch, LoRA and pixel settings are used.")
@click.option("--model", "model_name", help="Model to train (default: the recipe's), e.g. random:qwen2-vl-7b.")
@click.option("--backends", default="unsloth,hf", help="Comma-separated backends, each in its own process.")
@click.option("--steps", default=20, help="Timed optimizer steps.")
@click.option("--warmup", default=3, help="Untimed steps first (kernel compilation, allocator warm-up).")
@click.option("--memory-cap", help="Cap GPU memory, e.g. 16GB, to prove a recipe fits a smaller card.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe key; repeatable.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=Path("runs/bench.json"),
              help="Where to write the results as JSON.")
@click.option("--markdown", type=click.Path(path_type=Path), help="Append the results table to this file.")
@click.option("--packing", is_flag=True, help="Padded against packed (the first backend), each in its own process.")
@click.option("--data", "data_spec", help="Train on this dataset spec (hf:FOLDER, jsonl:FILE) instead of synthetic "
              "ChartQA-sized charts.")
@click.option("--memory", is_flag=True, help="Host memory of the first backend's LoRA steps with the base in 4-bit "
              "and in 16-bit (each in its own process, weights in bf16 as on a GPU), beside train.py --plan's "
              "estimate by part; for a CPU machine (Linux), e.g. --model random:qwen2-vl-2b --steps 2 --warmup 1.")
@click.option("--worker", hidden=True, help="Internal: run one backend in this process and print JSON.")
def main(recipe, model_name, backends, steps, warmup, memory_cap, overrides, json_path, markdown, packing, data_spec,
         memory, worker):
    """Benchmark training throughput and peak memory per backend."""
    from kit.cli import user_errors

    with user_errors():
        overrides = list(overrides) + ([f"model_name_or_path={model_name}"] if model_name else [])
        options = dict(steps=steps, warmup=warmup, memory_cap=memory_cap, data_spec=data_spec, memory=memory)
        if worker:
            print("BENCH " + json.dumps(measure(worker, recipe, overrides, **options)))
            return
        first = backends.split(",")[0]
        # (label, backend, extra overrides) per process
        if memory:
            runs = [(name, first, [f"load_in_4bit={name == '4-bit'}"]) for name in ("4-bit", "16-bit")]
        elif packing:
            runs = [(name, first, [f"packing={name == 'packed'}"]) for name in ("padded", "packed")]
        else:
            runs = [(backend, backend, []) for backend in backends.split(",")]
        results = [run_worker(label, backend, recipe, [*overrides, *extra], options) for label, backend, extra in runs]
        if memory:
            from kit.plan import measured

            table = measured.table(results, recipe, overrides, steps, warmup, first)
        else:
            table = to_markdown(results, recipe, overrides, steps, warmup, memory_cap, packing, data_spec)
        click.echo(table)
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(results, indent=2))
        if markdown:
            with markdown.open("a") as handle:
                handle.write("\n" + table + "\n")
        click.echo(f"results in {json_path}" + (f" and {markdown}" if markdown else ""))
        if packing:
            click.echo(packing_lines(results))


def run_worker(label, backend, recipe, overrides, options) -> dict:
    """One measurement in its own process (unsloth patches transformers for the whole process; the memory readings
    need a fresh one): its result, or {"backend": label, "error": ...}."""
    click.echo(f"--- {label}: {options['warmup']} warm-up + {options['steps']} timed steps ...")
    command = [sys.executable, __file__, "--worker", backend, "--recipe", recipe, "--steps", str(options["steps"]),
               "--warmup", str(options["warmup"]), *[a for o in overrides for a in ("--set", o)]]
    if options["memory_cap"]:
        command += ["--memory-cap", options["memory_cap"]]
    if options["data_spec"]:
        command += ["--data", options["data_spec"]]
    command += ["--memory"] if options["memory"] else []
    done = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("BENCH ")]
    if done.returncode or not lines:
        click.echo(f"{label} failed (exit {done.returncode}):\n{done.stderr[-3000:]}", err=True)
        return {"backend": label, "error": (done.stderr or done.stdout)[-500:]}
    result = json.loads(lines[-1][6:])
    return {**result, "backend": label, "backend_used": result["backend"]}


def measure(backend_name, recipe_name, overrides, steps, warmup, memory_cap=None, data_spec=None, memory=False):
    import recipes
    from kit import backend as backends

    recipe, _ = recipes.load(recipe_name, [*overrides, f"backend={backend_name}",
                                           f"max_steps={warmup + steps}", "logging_steps=1",
                                           f"save_steps={10 ** 9}", *([f"dataset={data_spec}"] if data_spec else [])])
    backend, _ = backends.select(recipe["backend"])
    import torch

    from kit import families
    from kit import model as models
    from kit.inputs import chat, packing
    from kit.plan import estimate, host_memory, measured
    from kit.train import heldout, progress, sft

    cuda = torch.cuda.is_available()
    if memory and (cuda or not host_memory.available()):
        raise UserError("--memory reads host memory on a Linux machine without a GPU (on a GPU the table's peak "
                        "allocated column is the measurement); run it there, or leave --memory out")
    if memory_cap and cuda:
        cap = float(memory_cap.upper().rstrip("GB")) * 1024**3
        torch.cuda.set_per_process_memory_fraction(cap / torch.cuda.get_device_properties(0).total_memory)
    precision = backends.precision(recipe["precision"], backend)
    if recipe["dataset"] != "synthetic" and not data_spec:
        # ChartQA-sized synthetic charts: no download, same pixel budget
        recipe.update(dataset="synthetic", synthetic_layout="chartqa")
    path = models.resolve(recipe["model_name_or_path"])
    model, processor, baseline, loaded = load_model(path, recipe, backend, backends.torch_dtype(precision), memory)
    recipe = estimate.with_model_grid(recipe, families.of_processor(processor), processor)  # aligned charts need it
    batch = recipe["per_device_train_batch_size"] * recipe["gradient_accumulation_steps"]
    samples = bench_samples(recipe, batch * (warmup + steps), data_spec)
    chat.set_limits(processor, recipe)  # image and video limits, as train.py sets them
    packer = packing.for_model(model, recipe, processor.tokenizer.pad_token_id)
    collator = TimedCollator(chat.VisionCollator(processor, recipe["max_length"], True, recipe["system_prompt"],
                                                 packer=packer))
    counter = progress.CountingCollator(collator)

    # The training train.py runs, only without logging and checkpoints.
    args = sft.sft_config(recipe, precision, backend, "/tmp/qwen2vl-kit-bench", max_steps=warmup + steps,
                          logging_steps=10**9, logging_first_step=False, save_strategy="no",
                          eval_strategy="no", load_best_model_at_end=False)  # no held-out set here
    timer, at_step = progress.StepTimer(counter, collator, warmup), progress.HostMemoryAtStep()
    dataset, collate = heldout.indexed_dataset(samples, counter)
    trainer = sft.trainer_class()(model=model, args=args, train_dataset=dataset, data_collator=collate,
                                  processing_class=processor, callbacks=[timer, at_step])
    if memory:
        host_memory.reset_peak()  # the load's own peak (quantizing from the bf16 checkpoint) is not training's
    trainer.train()
    result = timing_result(model, recipe, backend, precision, batch, steps, warmup, timer, counter, collator)
    if memory:
        result["host"] = measured.measured_parts(model, baseline, loaded, at_step.at_step, host_memory.peak())
        result["plan"] = measured.planned_parts(path, recipe, samples, processor, backend)
    return result


def load_model(path, recipe, backend, dtype, memory):
    """(model ready to train, processor, resident bytes before loading, after): with --memory the base is loaded
    in bf16, as a GPU holds it (a CPU run would load it in fp32), and read in whole before the reading."""
    import torch

    from kit import model as models
    from kit.plan import host_memory

    if not memory:
        return (*models.load_for_training(path, recipe, backend, dtype), 0, 0)
    baseline = host_memory.resident()
    model, processor = models.load_for_training(path, recipe, backend, torch.bfloat16)
    host_memory.touch(model)
    return model, processor, baseline, host_memory.resident()


def bench_samples(recipe, count, data_spec):
    """`count` training rows: the first rows of --data in the trainer's seeded order, else synthetic charts."""
    if data_spec:
        import data

        return data.load(recipe, recipe["dataset_split"], progress=False, limit=count)
    from data.synthetic import generate

    return generate("train", count, seed=0, chart_types=recipe["synthetic_chart_types"],
                    question_types=recipe["synthetic_question_types"], layout=recipe["synthetic_layout"],
                    size=recipe["synthetic_size"], grid=recipe["synthetic_grid"], progress=False)


def timing_result(model, recipe, backend, precision, batch, steps, warmup, timer, counter, collator) -> dict:
    """Throughput of the timed steps, peak GPU memory and model FLOPs utilisation, with what was measured on."""
    import torch

    cuda = torch.cuda.is_available()
    timed = slice(warmup, None)
    seconds, tokens = sum(timer.times[timed]), sum(timer.tokens[timed])
    # 4-bit weights are stored two to a uint8 element
    n_params = sum(p.numel() * (2 if p.dtype == torch.uint8 else 1) for p in model.parameters())
    result = {"backend": backend, "model": recipe["model_name_or_path"], "precision": precision,
              "load_in_4bit": recipe["load_in_4bit"], "batch": batch, "steps": steps,
              "samples_per_s": batch * steps / seconds, "tokens_per_s": tokens / seconds,
              "packing": recipe["packing"], # over every batch collated (loader workers run ahead of the timed steps)
              "padding": 1 - counter.tokens / max(collator.positions, 1),
              "ms_per_step": 1000 * seconds / steps,
              "data_share": sum(timer.data_seconds[timed]) / seconds, "params": n_params,
              "device": torch.cuda.get_device_name(0) if cuda else "CPU", "date": date.today().isoformat(),
              "versions": {name: __import__(name).__version__ for name in ("torch", "transformers", "trl", "peft")}}
    if cuda:
        result["peak_allocated_gb"] = torch.cuda.max_memory_allocated() / 1024**3
        result["peak_reserved_gb"] = torch.cuda.max_memory_reserved() / 1024**3
        result["driver"] = torch.version.cuda
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in result["device"]), None)
        # Frozen base + LoRA: forward 2N and activation gradients 2N FLOPs per token (no weight gradients).
        result["mfu"] = 4 * n_params * result["tokens_per_s"] / (peak * 1e12) if peak else None
    return result


class TimedCollator:
    """Adds up the seconds spent turning samples into tensors (image decoding, resizing, tokenising), and the
    positions the model will compute (padding included)."""

    def __init__(self, collator):
        import multiprocessing

        # shared memory: with dataloader_num_workers > 0 the collator runs in worker processes
        self.collator, self._seconds, self._positions = collator, multiprocessing.Value("d", 0.0), \
            multiprocessing.Value("q", 0)

    seconds = property(lambda self: self._seconds.value)
    positions = property(lambda self: self._positions.value)

    def __call__(self, samples):
        start = time.perf_counter()
        batch = self.collator(samples)
        with self._seconds.get_lock():
            self._seconds.value += time.perf_counter() - start
        with self._positions.get_lock():
            self._positions.value += batch["input_ids"].numel()
        return batch


def to_markdown(results, recipe, overrides, steps, warmup, memory_cap, packing=False, data_spec=None) -> str:
    ok = [r for r in results if "error" not in r]
    backends = ok[0]["backend_used"] if packing and ok else ",".join(r["backend"] for r in results)
    command = f"python bench.py --recipe {recipe} --backends {backends} " \
              f"--steps {steps} --warmup {warmup}" + (f" --memory-cap {memory_cap}" if memory_cap else "") + \
              " --packing" * packing + (f" --data {data_spec}" if data_spec else "") + \
              "".join(f" --set {o}" for o in overrides)
    lines = [f"Command: `{command}`", ""]
    if ok:
        first = ok[0]
        lines += [f"Device: {first['device']}, driver/CUDA {first.get('driver', '-')}, {first['date']}, "
                  + ", ".join(f"{k} {v}" for k, v in first["versions"].items()), ""]
    lines += ["| backend | samples/s | tokens/s | ms/step | peak alloc GB | peak reserved GB | MFU | data share "
              "| padding |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['backend']} | failed: {r['error'].splitlines()[-1][:80] if r['error'] else '?'} "
                         "| | | | | | | |")
            continue
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") else "-"
        allocated, reserved = (f"{r[k]:.2f}" if k in r else "-" for k in ("peak_allocated_gb", "peak_reserved_gb"))
        lines.append(f"| {r['backend']} | {r['samples_per_s']:.2f} | {r['tokens_per_s']:,.0f} | "
                     f"{r['ms_per_step']:,.0f} | {allocated} | {reserved} | {mfu} | {r['data_share']:.0%} "
                     f"| {r['padding']:.1%} |")
    by_name = {r["backend"]: r for r in ok}
    if "unsloth" in by_name and "hf" in by_name:
        u, h = by_name["unsloth"], by_name["hf"]
        lines += ["", f"unsloth/hf: throughput {u['tokens_per_s'] / h['tokens_per_s']:.2f}x, "
                      f"peak memory {u['peak_allocated_gb'] / h['peak_allocated_gb']:.2f}x"]
    return "\n".join(lines)


def packing_lines(results) -> str:
    """The three closing lines of --packing: each run's padding share and tokens/s, then their ratio."""
    by_name = {r["backend"]: r for r in results if "error" not in r}
    lines = [f"{name}: padding {100 * r['padding']:.1f} %, {r['tokens_per_s']:,.0f} tok/s"
             for name, r in by_name.items()]
    if len(by_name) == 2:
        ratio = by_name["packed"]["tokens_per_s"] / by_name["padded"]["tokens_per_s"]
        lines.append(f"packed/padded tokens/s: {ratio:.2f} x")
    return "\n".join(lines)


main.help = help_with_examples(main.help, __doc__)  # --help shows the examples above

if __name__ == "__main__":
    main()
