"""Synthetic charts drawn with matplotlib from a seed, with questions whose answers are known exactly.

Two layouts:
- `aligned` (the demo): a square chart whose bar slots are exactly one vision-token column wide (`grid` pixels:
  the model's patch x merge, which the kit reads from the model's family), labelled A, B, C... from the left.
  A tiny model can only learn to read charts laid out like this.
- `chartqa` (benchmarks): a ChartQA-sized chart (about 800x600) with axes, a title and category names.

Question types: `count` (how many bars/points), `max` / `min` (which label is highest/lowest), `value`
(the value of one label), `last` (the label of the rightmost bar/point: a position question, which a model that
counts the bars can answer without reading their heights). Rendered PNGs are cached, keyed by everything that
changes the pixels.
"""

import hashlib
import json
import random
from functools import partial
from pathlib import Path

from data.formats import question_sample
from kit.errors import UserError


class SyntheticError(UserError, ValueError):
    """Synthetic-chart settings that cannot be drawn; the message names the recipe key to change."""

LABELS = ["A", "B", "C", "D", "E", "F", "G", "H"]
CATEGORY_NAMES = ["Apples", "Bananas", "Cherries", "Dates", "Figs", "Grapes", "Kiwis", "Lemons", "Mangos",
                  "Oranges", "Pears", "Plums", "Norway", "Chile", "Japan", "Kenya", "Peru", "Spain"]
QUESTION_TEMPLATES = {
    "count": "How many {mark}s are in the chart?",
    "max": "Which label has the highest value?",
    "min": "Which label has the lowest value?",
    "value": "What is the value of {label}?",
    "last": "What is the label of the last {mark}?",
}
CHART_TYPES = ("bar", "line")
# Each split draws from its own index range of the same seed, so no chart or question is in two splits.
SPLIT_OFFSETS = {"train": 0, "test": 10_000_000, "val": 20_000_000}


def make_spec(index: int, seed: int, chart_types, question_types, layout: str, size: int, grid: int = 0) -> dict:
    """Everything about one chart and its question, from (seed, index) alone; `grid`: pixels per vision-token
    column, which an aligned chart's slots are as wide as."""
    rng = random.Random(f"{seed}:{index}")
    chart = rng.choice(list(chart_types))
    qtype = rng.choice(list(question_types))
    slots = size // grid if layout == "aligned" else 8
    count = rng.randint(2, min(slots, len(LABELS) if layout == "aligned" else slots))
    labels = LABELS[:count] if layout == "aligned" else rng.sample(CATEGORY_NAMES, count)
    while True:  # distinct values so that max/min have one right answer
        values = [rng.randint(1, 19) * 5 for _ in range(count)]
        if len(set(values)) == count:
            break
    target = rng.randrange(count)
    mark = "bar" if chart == "bar" else "point"
    question = QUESTION_TEMPLATES[qtype].format(mark=mark, label=labels[target])
    answer = {"count": str(count), "max": labels[values.index(max(values))],
              "min": labels[values.index(min(values))], "value": str(values[target]), "last": labels[-1]}[qtype]
    return dict(chart=chart, qtype=qtype, labels=labels, values=values, question=question, answer=answer,
                layout=layout, size=size, slots=slots)


def render(spec: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, values = spec["labels"], spec["values"]
    if spec["chart"] not in CHART_TYPES:  # never draw one kind of chart and call it another
        raise ValueError(f"synthetic chart type {spec['chart']!r} is not one of: {', '.join(CHART_TYPES)}")
    if spec["layout"] == "aligned":
        side = spec["size"]
        fig = plt.figure(figsize=(side / 100, side / 100), dpi=100)
        ax = fig.add_axes([0, 0, 1, 1])
        slots = spec["slots"]
        ax.set_xlim(0, slots)
        ax.set_ylim(-14, 100)  # the band below zero holds the labels
        ax.axis("off")
        x = [i + 0.5 for i in range(len(values))]
        if spec["chart"] == "bar":
            ax.bar(x, values, width=0.7, color="tab:blue")
        elif spec["chart"] == "line":
            ax.plot(x, values, color="tab:red", marker="o", markersize=4, linewidth=1.5)
        for xi, label in zip(x, labels):
            ax.text(xi, -7, label, ha="center", va="center", fontsize=7)
    else:
        fig = plt.figure(figsize=(8, 6), dpi=100)
        ax = fig.add_subplot()
        if spec["chart"] == "bar":
            ax.bar(labels, values, color="tab:blue")
        elif spec["chart"] == "line":
            ax.plot(labels, values, color="tab:red", marker="o")
        ax.set_title("Synthetic chart")
        ax.set_ylim(0, 100)
        ax.grid(axis="y", alpha=0.3)
    fig.savefig(path)
    plt.close(fig)


def generate(split: str = "train", num: int = 100, seed: int = 0, chart_types=("bar", "line"),
             question_types=("count", "max", "min", "value"), layout: str = "aligned", size: int = 140,
             grid: int = 0, cache: Path | None = None, progress: bool = True) -> list[dict]:
    """`num` samples of `split`; each split draws from its own index range of the same seed. The aligned layout
    needs `grid`, the model's pixels per vision token (the recipe's synthetic_grid, filled in from the model)."""
    from tqdm import tqdm

    from kit.paths import cache_dir, write_with

    if split not in SPLIT_OFFSETS:
        raise ValueError(f"synthetic split must be one of {', '.join(SPLIT_OFFSETS)}, not {split!r}")
    for kind, chosen, allowed in (("chart type", chart_types, CHART_TYPES),
                                  ("question type", question_types, tuple(QUESTION_TEMPLATES))):
        unknown = [item for item in chosen if item not in allowed]
        if unknown or not chosen:
            raise ValueError(f"synthetic {kind}s must be among {', '.join(allowed)}, "
                             f"not {', '.join(unknown) or 'none'}")
    if layout not in ("aligned", "chartqa"):
        raise ValueError(f"synthetic layout must be 'aligned' or 'chartqa', not {layout!r}")
    if layout == "aligned" and grid <= 0:
        raise SyntheticError("aligned synthetic charts line up with the model's vision tokens: set synthetic_grid "
                             "to its pixels per token (patch x merge, e.g. --set synthetic_grid=28), or use "
                             "synthetic_layout=chartqa")
    if layout == "aligned" and (size % grid or size < 2 * grid):
        raise SyntheticError(f"aligned charts need a synthetic_size that is a multiple of the model's {grid}-pixel "
                             f"grid (>= {2 * grid}), not {size}; e.g. --set synthetic_size={5 * grid}")
    offset = SPLIT_OFFSETS[split]
    slots = size // grid if layout == "aligned" else 0  # how many bars fit changes the pixels
    key = json.dumps([seed, sorted(chart_types), sorted(question_types), layout, size, slots], sort_keys=True)
    folder = Path(cache or cache_dir() / "synthetic") / hashlib.sha1(key.encode()).hexdigest()[:12]
    folder.mkdir(parents=True, exist_ok=True)
    samples = []
    for i in tqdm(range(num), desc=f"synthetic {split}", disable=not progress, mininterval=2):
        spec = make_spec(offset + i, seed, chart_types, question_types, layout, size, grid)
        path = folder / f"{offset + i:08d}.png"
        if not path.exists():
            write_with(path, partial(render, spec))
        samples.append(question_sample(f"synthetic-{split}-{i}", [str(path)], spec["question"], [spec["answer"]],
                                       qtype=spec["qtype"]))
    return samples
