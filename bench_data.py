"""How the kit scales with the number of rows: ChartQA-shaped parquet data sets (ChartQA's columns, charts of
ChartQA's size, mostly RGBA PNGs), the tiny model, and for each size the peak host memory of `--plan` and of a
5-step run, the time to the first step, and a cached re-plan. Prints a markdown table for BENCHMARKS.md.

    python bench_data.py                          # 1,000 / 10,000 / 28,299 rows
    python bench_data.py --rows 1000,10000 --markdown BENCHMARKS.md
    python bench_data.py --build-only --rows 500 --out /tmp/charts   # just write the parquet folders
    python bench_data.py --build-only --rows 400 --varied-sizes --out runs/charts   # data for bench.py --packing

Each size runs with fresh caches (the parquet -> Arrow conversion and the preflight checks start from
nothing), then `--plan` again on the warm cache. Peak memory is the largest sum of PSS over the process and
its children (preflight workers, dataloader workers: pages they share count once), sampled every 0.1 s; in
brackets the peak RSS of the main process alone. The 5-step run uses the chartqa
recipe's batch of 2 without gradient accumulation, its 2 dataloader workers, and the tiny model.
"""

import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

SIZES = [(800, 557), (800, 600), (850, 600), (620, 800), (800, 500)]  # ChartQA's common chart shapes
# --varied-sizes: small to large charts, so that samples differ in length as much as they do for padding to
# matter (with the chartqa recipe's max_pixels: about 70 to 400 image tokens)
VARIED_SIZES = [(300, 200), (800, 557), (420, 300), (620, 800), (360, 480), (1200, 900), (560, 350), (850, 600)]
WORDS = ["Apples", "Pears", "Kiwis", "Plums", "Figs", "Norway", "Chile", "Japan", "Kenya", "Peru", "Spain",
         "Retail", "Energy", "Health", "Transport", "Other"]


def chart_png(index: int, sizes=SIZES) -> bytes:
    """One ChartQA-like chart: bars or lines with value labels, a title, a legend, an RGBA PNG."""
    import random

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = random.Random(index)
    width, height = sizes[index % len(sizes)]
    fig, ax = plt.subplots(figsize=(width / 100, height / 100), dpi=100)
    labels = rng.sample(WORDS, rng.randint(4, 9))
    for series in range(rng.randint(1, 3)):
        values = [round(rng.uniform(1, 95), 1) for _ in labels]
        if index % 3:
            bars = ax.bar([i + 0.25 * series for i in range(len(labels))], values, width=0.25, label=f"{2015 + series}")
            ax.bar_label(bars, fontsize=7)
        else:
            ax.plot(labels, values, marker="o", label=f"{2015 + series}")
            for x, v in enumerate(values):
                ax.annotate(f"{v}", (x, v), fontsize=7)
    ax.set_xticks(range(len(labels)), labels, rotation=20)
    ax.set_title(f"Share of {rng.choice(WORDS).lower()} by category, {2000 + index % 23}")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    fig.text(0.01, 0.01, "Source: Statista 2021 | Additional Information", fontsize=7)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", transparent=index % 5 != 0)  # mostly RGBA, like ChartQA
    plt.close(fig)
    return buffer.getvalue()


def build_parquet(folder: Path, rows: int, pool: int = 64, eval_rows: int = 0, file_rows: int = 2000, sizes=SIZES):
    """train-*.parquet (and val-*.parquet with eval_rows) with ChartQA's columns: image {bytes, path},
    query, label (a list), human_or_machine. Images come from a pool of `pool` distinct charts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    charts = [chart_png(i, sizes) for i in range(pool)]
    features = {"image": {"_type": "Image"}, "query": {"dtype": "string", "_type": "Value"},
                "label": {"feature": {"dtype": "string", "_type": "Value"}, "_type": "List"},
                "human_or_machine": {"dtype": "int64", "_type": "Value"}}
    schema = pa.schema([("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                        ("query", pa.string()), ("label", pa.list_(pa.string())), ("human_or_machine", pa.int64())],
                       metadata={"huggingface": json.dumps({"info": {"features": features}})})
    for split, count, offset in (("train", rows, 0), ("val", eval_rows, 10_000_000)):
        files = max(1, -(-count // file_rows)) if count else 0
        for part in range(files):
            ids = range(part * file_rows, min(count, (part + 1) * file_rows))
            table = pa.table({
                "image": [{"bytes": charts[(offset + i) % pool], "path": f"{offset + i}.png"} for i in ids],
                "query": [f"What is the value of {WORDS[(offset + i) % len(WORDS)]} in {1990 + (offset + i) % 31} "
                          f"(row {offset + i})?" for i in ids],
                "label": [[str((offset + i) % 97)] for i in ids],
                "human_or_machine": [(offset + i) % 2 for i in ids],
            }, schema=schema)
            # no dictionary encoding: a reused chart must cost its full bytes in every row, as distinct charts do
            pq.write_table(table, folder / f"{split}-{part:05d}-of-{files:05d}.parquet", use_dictionary=False)
    return folder


def measure(command: list[str], env: dict, first_line: str | None = None) -> dict:
    """Run `command`; peak RSS (process + children), wall time, and the time until `first_line` appears."""
    import psutil

    started = time.time()
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak, first, output = 0, None, []
    import threading

    def read():
        nonlocal first
        for line in process.stdout:
            output.append(line)
            if first_line and first is None and first_line in line:
                first = time.time() - started

    reader = threading.Thread(target=read)
    reader.start()
    root, main_peak = psutil.Process(process.pid), 0
    while process.poll() is None:
        try:
            main_peak = max(main_peak, root.memory_info().rss)
            # PSS: pages shared by forked workers (torch, the model) count once, split between them
            total = sum(_pss(p) for p in [root, *root.children(recursive=True)])
            peak = max(peak, total)
        except psutil.Error:
            pass
        time.sleep(0.1)
    reader.join()
    if process.returncode:
        raise click.ClickException(f"{' '.join(command)} failed:\n{''.join(output[-30:])}")
    return {"seconds": time.time() - started, "peak_gb": peak / 1e9, "main_rss_gb": main_peak / 1e9,
            "first_step_s": first}


def _pss(process) -> int:
    try:
        return process.memory_full_info().pss
    except AttributeError:  # no PSS on this platform
        return process.memory_info().rss


def fresh_caches(root: Path) -> dict:
    """Environment with empty preflight and datasets caches (the tiny model is linked in, not rebuilt)."""
    from kit.model import tiny_model_dir

    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    tiny = tiny_model_dir()
    (root / tiny.name).symlink_to(tiny)
    return {**os.environ, "QWEN2VL_KIT_CACHE": str(root), "HF_DATASETS_CACHE": str(root / "datasets"),
            "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--rows", default="1000,10000,28299", help="Comma-separated training-set sizes.")
@click.option("--pool", default=64, help="Distinct chart images, reused across rows.")
@click.option("--out", type=click.Path(path_type=Path), help="Where the parquet folders go. Default: a temp folder.")
@click.option("--build-only", is_flag=True, help="Write the parquet folders and stop.")
@click.option("--markdown", type=click.Path(path_type=Path), help="Also append the table to this file.")
@click.option("--varied-sizes", is_flag=True, help="Charts from 300x200 to 1200x900 px instead of ChartQA's common "
              "~800x600 (folders chartqa-N-varied), e.g. for bench.py --packing.")
def main(rows, pool, out, build_only, markdown, varied_sizes):
    """Build ChartQA-shaped parquet data sets and measure --plan and a 5-step run on each."""
    sizes = [int(n) for n in rows.split(",") if n.strip()]
    out = out or Path(tempfile.mkdtemp(prefix="bench-data-"))
    python, train = sys.executable, str(Path(__file__).with_name("train.py"))
    lines = ["| rows | parquet MB | plan: peak memory (first) | plan: time (first) | cached re-plan "
             "| 5-step run: peak memory | time to first step |", "|---|---|---|---|---|---|---|"]
    for size in sizes:
        folder = out / (f"chartqa-{size}-varied" if varied_sizes else f"chartqa-{size}")
        if not (folder / ".done").exists():
            started = time.time()
            build_parquet(folder, size, pool=pool, eval_rows=1920,  # a val split, as ChartQA has
                          sizes=VARIED_SIZES if varied_sizes else SIZES)
            (folder / ".done").touch()
            click.echo(f"built {folder} in {time.time() - started:.0f} s")
        if build_only:
            continue
        megabytes = sum(f.stat().st_size for f in folder.glob("*.parquet")) / 1e6
        common = ["--recipe", "chartqa", "--set", f"dataset=hf:{folder}", "--set", "model_name_or_path=tiny",
                  "--set", "backend=hf", "--set", "load_in_4bit=false", "--set", "optim=adamw_torch",
                  "--set", "gradient_checkpointing=false",
                  # the val split is loaded and held out as in training, but not scored: 5 steps end before any
                  # evaluation, and the end-of-run one load_best_model_at_end asks for would be timed too
                  "--set", "eval_steps=0"]
        caches = out / "caches"
        env = fresh_caches(caches)
        plan = measure([python, train, *common, "--plan"], env)
        replan = measure([python, train, *common, "--plan"], env)
        env = fresh_caches(caches)
        # one batch a step (no accumulation): the figure is about getting to training, not the tiny model's speed
        run = measure([python, train, *common, "--set", "max_steps=5", "--set", "logging_steps=1",
                       "--set", "gradient_accumulation_steps=1",
                       "--output", str(out / f"run-{size}"), "--force"], env, first_line="step 00001/")
        lines.append(f"| {size:,} | {megabytes:,.0f} | {plan['peak_gb']:.2f} GB ({plan['main_rss_gb']:.2f}) "
                     f"| {plan['seconds']:.0f} s | {replan['seconds']:.1f} s | {run['peak_gb']:.2f} GB "
                     f"({run['main_rss_gb']:.2f}) | {run['first_step_s']:.0f} s |")
        click.echo(lines[-1])
    if build_only:
        return
    table = "\n".join(lines)
    click.echo(f"\n{table}")
    if markdown:
        with markdown.open("a") as handle:
            handle.write(f"\n`python bench_data.py --rows {rows}` ({os.cpu_count()} cores):\n\n{table}\n")


if __name__ == "__main__":
    main()
