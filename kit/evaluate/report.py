"""The evaluation report, from scored rows: report.md, report.json, report.png, diff.jsonl and diff.html.

A scored row is one question: {"id", "question", "references", optional "image", "subset", "qtype", and
"systems": {name: {"answer", and each reported metric's verdict (kit/evaluate/task_metrics.verdicts: "relaxed",
"exact", "anls", "cer", ...)}}}; a system that did not answer a question is absent from it. eval.py makes these rows
from a model run, or (`--score`) from prediction files any tool wrote (kit/evaluate/predictions.py).
"""

import html
import itertools
import json
from pathlib import Path

from kit.evaluate import task_metrics
from kit.evaluate.scoring import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED
from kit.paths import build_dir, write_jsonl

GROUPS = ("subset", "qtype")  # ChartQA human/augmented; synthetic question type
SHUFFLED = " (shuffled)"
THUMBNAIL_PIXELS = 160


# --- numbers ----------------------------------------------------------------------------------------------
def comparison_pairs(names: list[str]) -> list[tuple[str, str]]:
    """(baseline, candidate) pairs: each system against its shuffled-image control, then every two systems in
    the order given (so base before finetuned)."""
    controls = [(name + SHUFFLED, name) for name in names if name + SHUFFLED in names]
    plain = [name for name in names if not name.endswith(SHUFFLED)]
    return controls + list(itertools.combinations(plain, 2))


def system_entry(rows: list[dict], name: str, reported: tuple) -> dict:
    """One system's numbers: every reported metric over all its questions and within each group."""
    answered = [row["systems"][name] for row in rows if name in row["systems"]]
    entry = {"samples": len(answered), **{task_metrics.key(m): task_metrics.score(answered, m) for m in reported},
             "groups": {},
             # replies that began with a think block, scored on what followed it (eval.py takes it off)
             "think_blocks": sum("think" in verdict for verdict in answered)}
    for group_key in GROUPS:
        members: dict[str, list] = {}
        for row in rows:
            if name in row["systems"] and row.get(group_key) is not None:
                members.setdefault(str(row[group_key]), []).append(row["systems"][name])
        for group, verdicts in sorted(members.items()):
            entry["groups"].setdefault(group_key, {})[group] = {
                "samples": len(verdicts), **{task_metrics.key(m): task_metrics.score(verdicts, m) for m in reported}}
    return entry


def summarize(rows: list[dict], names: list[str], metric: str = "relaxed_accuracy", seconds: dict | None = None,
              relaxed_rule: str = "chartqa") -> dict:
    """Every number of the report (what report.json holds): `metric` (a kit/evaluate/task_metrics name) and the
    metrics shown with it, per system and group, and every pair of systems compared on each."""
    reported = task_metrics.REPORTED[metric]
    systems = {}
    for name in names:
        systems[name] = system_entry(rows, name, reported)
        if seconds and name in seconds:
            systems[name]["seconds_per_sample"] = seconds[name]
    pairs = []
    for baseline, candidate in comparison_pairs(names):
        both = [row for row in rows if baseline in row["systems"] and candidate in row["systems"]]
        if not both:
            continue
        before, after = [row["systems"][baseline] for row in both], [row["systems"][candidate] for row in both]
        compared = {task_metrics.key(m): task_metrics.compare(before, after, m) for m in reported}
        pairs.append({"baseline": baseline, "candidate": candidate, "samples": len(both),
                      **compared[task_metrics.key(metric)], "metrics": compared,
                      "groups": group_pairs(both, baseline, candidate, metric)})
    return {"metric": metric, "key": task_metrics.key(metric),
            "higher_is_better": task_metrics.higher_is_better(metric),
            "relaxed_rule": relaxed_rule, "metrics": [task_metrics.key(m) for m in reported],
            "labels": {task_metrics.key(m): task_metrics.label(m, relaxed_rule) for m in reported},
            "rules": task_metrics.rules(metric, relaxed_rule),
            "interval": {"method": "percentile bootstrap over questions", "level": 0.95,
                         "resamples": BOOTSTRAP_RESAMPLES, "seed": BOOTSTRAP_SEED},
            "samples": len(rows), "systems": systems, "pairs": pairs}


def names_of(summary: dict) -> dict:
    """{report key: metric name} for the summary's metrics."""
    return {task_metrics.key(m): m for m in task_metrics.REPORTED[summary["metric"]]}


# --- report.md ----------------------------------------------------------------------------------------------
def percent(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def cell(entry: dict) -> str:
    """"70.5 [64.0, 76.5]": the metric and its interval, in %."""
    if entry["value"] is None:
        return "-"
    return f"{percent(entry['value'])} [{percent(entry['low'])}, {percent(entry['high'])}]"


def table(summary: dict) -> str:
    """The systems table: every reported metric overall, the first one per group."""
    systems, first, labels = summary["systems"], summary["key"], summary["labels"]
    groups = sorted({(k, g) for entry in systems.values() for k, members in entry["groups"].items()
                     for g in members}, key=lambda kg: (GROUPS.index(kg[0]), kg[1]))
    timed = any("seconds_per_sample" in entry for entry in systems.values())
    short = summary["relaxed_rule"] if first == "relaxed" else labels[first]
    header = ["system", *(labels[k] for k in summary["metrics"])] + [f"{k}={g} ({short})" for k, g in groups] + \
             ["samples"] + (["s/sample"] if timed else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, entry in systems.items():
        cells = [name, *(cell(entry[k]) for k in summary["metrics"])]
        for group_key, group in groups:
            member = entry["groups"].get(group_key, {}).get(group)
            cells.append(cell(member[first]) if member else "-")
        cells.append(str(entry["samples"]))
        if timed:
            cells.append(f"{entry['seconds_per_sample']:.3f}" if "seconds_per_sample" in entry else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def group_pairs(both: list[dict], baseline: str, candidate: str, metric: str) -> dict:
    """The pair compared on the task's metric within each question type / subset the rows carry."""
    groups = {}
    for key in GROUPS:
        members = sorted({str(row[key]) for row in both if row.get(key) is not None})
        for group in members:
            inside = [row for row in both if str(row.get(key)) == group]
            groups.setdefault(key, {})[group] = {"samples": len(inside), **task_metrics.compare(
                [row["systems"][baseline] for row in inside], [row["systems"][candidate] for row in inside], metric)}
    return groups


def group_pairs_table(summary: dict) -> str:
    """The paired comparisons on the first metric within each question type / subset; "" when rows have none."""
    flag = task_metrics.kind(summary["metric"]) == "flag"
    counts = ("fixed", "broken", "both_right", "both_wrong") if flag else ("better", "worse", "ties")
    header = ["group", "baseline", "candidate", "samples", *(c.replace("_", " ") for c in counts),
              "change (points)", "McNemar p" if flag else "sign test p"]
    lines = []
    for pair in summary["pairs"]:
        for key, members in pair.get("groups", {}).items():
            for group, found in members.items():
                change = (f"{100 * found['change']:+.1f} [{100 * found['change_low']:+.1f}, "
                          f"{100 * found['change_high']:+.1f}]")
                test = found["mcnemar_p" if flag else "sign_test_p"]
                lines.append("| " + " | ".join([f"{key}={group}", pair["baseline"], pair["candidate"],
                                                str(found["samples"]), *(str(found[c]) for c in counts), change,
                                                f"{test:.3g}"]) + " |")
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *lines]) if lines else ""


def pairs_table(summary: dict, metric_key: str | None = None) -> str:
    """Paired comparisons on one metric (the first by default): counts, change with its interval, and the test."""
    metric_key = metric_key or summary["key"]
    flag = task_metrics.kind(names_of(summary)[metric_key]) == "flag"
    counts = ("fixed", "broken", "both_right", "both_wrong") if flag else ("better", "worse", "ties")
    header = ["baseline", "candidate", "samples", *(c.replace("_", " ") for c in counts), "change (points)",
              "McNemar p" if flag else "sign test p"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for pair in summary["pairs"]:
        found = pair["metrics"][metric_key]
        change = f"{100 * found['change']:+.1f} [{100 * found['change_low']:+.1f}, {100 * found['change_high']:+.1f}]"
        test = found["mcnemar_p" if flag else "sign_test_p"]
        lines.append("| " + " | ".join([pair["baseline"], pair["candidate"], str(pair["samples"]),
                                        *(str(found[c]) for c in counts), change, f"{test:.3g}"]) + " |")
    return "\n".join(lines)


def tables(summary: dict) -> str:
    """What eval.py prints at the end: the systems table, then the paired comparisons on the first metric."""
    by_group = group_pairs_table(summary)
    return table(summary) + ("\n\n" + pairs_table(summary) if summary["pairs"] else "") + \
        ("\n\n" + by_group if by_group else "")


def markdown(summary: dict, title: str, source: str) -> str:
    interval, labels = summary["interval"], summary["labels"]
    text = [f"# {title}", "",
            f"{source}. Each cell: the metric in % and its 95 % interval [low, high], a percentile bootstrap over "
            f"the questions ({interval['resamples']:,} resamples, seed {interval['seed']}).", ""]
    text += [f"- `{labels[k]}`{' and every `subset=` / `qtype=` column' if k == summary['key'] else ''}: "
             f"{summary['rules'][k]}"
             f"{'' if task_metrics.higher_is_better(names_of(summary)[k]) else ' (lower is better)'}."
             for k in summary["metrics"]]
    text += ["", table(summary)]
    flags = [entry[k] for entry in summary["systems"].values() for k in summary["metrics"]
             if task_metrics.kind(names_of(summary)[k]) == "flag"]
    if any(found["value"] in (0, 1) for found in flags):
        text += ["", "A system right on none (or all) of the questions has a zero-width bootstrap interval: every "
                 "resample is the same. Read it with the rule of three: with n questions, the true rate is below "
                 "3/n (or above 1 - 3/n) at 95 %."]
    if summary["pairs"]:
        text += ["", "fixed / better: the candidate does better than the baseline on that question; broken / worse: "
                 "the reverse. change: candidate minus baseline in points, with its paired bootstrap interval (the "
                 "same questions resampled for both). McNemar p (right/wrong) and sign test p (numbers): exact "
                 "two-sided binomial test of one direction against the other (small p: unlikely to be chance)."]
        for metric_key in summary["metrics"]:
            text += ["", f"## Paired comparisons (same questions, {labels[metric_key]})", "",
                     pairs_table(summary, metric_key)]
    by_group = group_pairs_table(summary)
    if by_group:
        text += ["", "## The same comparisons within each question type or subset", "", by_group]
    return "\n".join(text) + "\n"


# --- report.png ---------------------------------------------------------------------------------------------
def plot(summary: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary["systems"])
    entries = [summary["systems"][name][summary["key"]] for name in names]
    values = [100 * (e["value"] or 0) for e in entries]
    errors = [[100 * ((e["value"] or 0) - (e["low"] or 0)) for e in entries],
              [100 * ((e["high"] or 0) - (e["value"] or 0)) for e in entries]]
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 2, 3.8), dpi=100)
    colors = ["lightgray" if name.endswith(SHUFFLED) else "tab:blue" for name in names]
    ax.bar(range(len(names)), values, color=colors, yerr=errors, capsize=6, ecolor="black")
    for i, value in enumerate(values):  # right of the whisker, so the two never overlap
        ax.text(i + 0.06, value + 1, f"{value:.1f}", ha="left", va="bottom")
    ax.set_xticks(range(len(names)), names, rotation=15)
    better = "" if summary["higher_is_better"] else ", lower is better"
    ax.set_ylabel(f"{summary['labels'][summary['key']]} (%{better})")
    ax.set_ylim(0, max(105, max(values) + max(errors[1], default=0) + 10))  # an error rate can pass 100 %
    ax.set_title(f"{summary['samples']} questions; whiskers: 95 % bootstrap interval", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --- diff.jsonl and diff.html -------------------------------------------------------------------------------
def diff_rows(rows: list[dict], summary: dict) -> list[dict]:
    """Every question whose verdict on the first metric changed between a pair's baseline and candidate."""
    metric, changed = summary["metric"], []
    for pair in summary["pairs"]:
        baseline, candidate = pair["baseline"], pair["candidate"]
        for row in rows:
            if baseline not in row["systems"] or candidate not in row["systems"]:
                continue
            before, after = row["systems"][baseline], row["systems"][candidate]
            change = task_metrics.changed(before, after, metric)
            if change:
                changed.append({"baseline": baseline, "candidate": candidate, "change": change,
                                **{k: row[k] for k in ("id", "question", "image", *GROUPS) if row.get(k) is not None},
                                "references": row["references"], "baseline_answer": before["answer"],
                                "candidate_answer": after["answer"]})
    return changed


def thumbnail(image, path: Path) -> bool:
    """A small PNG of `image` (a path or PIL image) at `path`; False when there is no image to show."""
    from PIL import Image

    try:
        if isinstance(image, Image.Image):
            small = image.convert("RGB")
        else:
            with Image.open(image) as opened:
                small = opened.convert("RGB")
        small.thumbnail((THUMBNAIL_PIXELS, THUMBNAIL_PIXELS))
        small.save(path)
        return True
    except (OSError, ValueError):  # a missing or unreadable chart: the page says "(no image)"
        return False


def diff_page(changed: list[dict], summary: dict, images: dict, folder: Path, title: str) -> str:
    """diff.html: per pair, the questions the candidate did better on and those it did worse on (fixed / broken
    for a right/wrong metric), each with its image."""
    (folder / "thumbs").mkdir(exist_ok=True)
    made: dict[str, str | None] = {}
    pairs, label = summary["pairs"], summary["labels"][summary["key"]]
    directions = ("fixed", "broken") if task_metrics.kind(summary["metric"]) == "flag" else ("better", "worse")
    parts = [f"<!doctype html><meta charset=utf-8><title>{html.escape(title)}: what changed</title>",
             "<style>body{font-family:sans-serif;margin:1.5em}td{vertical-align:top;padding:4px 10px;"
             "border-bottom:1px solid #ddd}.fixed,.better{color:#1a7f37}.broken,.worse{color:#cf222e}</style>",
             f"<h1>{html.escape(title)}: what changed</h1>",
             f"<p>{html.escape(label)} verdicts that differ between two systems on the same question. Shuffled-image "
             "systems were shown another question's image; the thumbnail is the question's own.</p><ul>"]
    counts: dict[tuple, int] = {}
    for d in changed:
        found = (d["baseline"], d["candidate"], d["change"])
        counts[found] = counts.get(found, 0) + 1
    parts += [f"<li>{html.escape(p['candidate'])} vs {html.escape(p['baseline'])}: " + ", ".join(
        f"<a href='#{i}-{c}'>{c} {counts.get((p['baseline'], p['candidate'], c), 0)}</a>" for c in directions)
        + "</li>" for i, p in enumerate(pairs)]
    parts.append("</ul>")
    for i, (baseline, candidate) in enumerate((pair["baseline"], pair["candidate"]) for pair in pairs):
        group = [d for d in changed if (d["baseline"], d["candidate"]) == (baseline, candidate)]
        for change in directions:
            members = [d for d in group if d["change"] == change]
            parts.append(f"<h2 id={i}-{change}>{html.escape(candidate)} vs {html.escape(baseline)}: "
                         f"<span class={change}>{change}</span> ({len(members)})</h2>")
            if not members:
                continue
            parts.append(f"<table><tr><th>image</th><th>question</th><th>reference</th>"
                         f"<th>{html.escape(baseline)}</th><th>{html.escape(candidate)}</th></tr>")
            for d in members:
                key = str(d["id"])
                if key not in made:
                    name = f"thumbs/{len(made):05d}.png"
                    made[key] = name if images.get(key) is not None and thumbnail(images[key], folder / name) \
                        else None
                chart = f"<img src='{made[key]}' loading=lazy>" if made[key] else "(no image)"
                parts.append(f"<tr><td>{chart}</td><td>{html.escape(str(d.get('question', '')))}<br><small>"
                             f"{html.escape(key)}</small></td><td>{html.escape(' | '.join(d['references']))}</td>"
                             f"<td>{html.escape(d['baseline_answer'])}</td>"
                             f"<td class={change}>{html.escape(d['candidate_answer'])}</td></tr>")
            parts.append("</table>")
    return "\n".join(parts) + "\n"


# --- the whole report ---------------------------------------------------------------------------------------
def save(out: Path, rows: list[dict], names: list[str], metric: str, title: str, source: str,
         seconds: dict | None = None, images: dict | None = None, extra_files: dict | None = None,
         relaxed_rule: str = "chartqa") -> dict:
    """Write every report file into `out` (through a temporary folder renamed at the end; the caller has
    checked that `out` may be replaced). `metric`: the kit/evaluate/task_metrics name the rows were scored for.
    `images`: {row id: path or PIL image} for thumbnails. `extra_files`: {file name: rows} also written as JSONL.
    Returns the summary."""
    summary = summarize(rows, names, metric, seconds, relaxed_rule)
    changed = diff_rows(rows, summary)

    def write(tmp: Path):
        write_jsonl(tmp / "predictions.jsonl", rows)
        for name, extra in (extra_files or {}).items():
            write_jsonl(tmp / name, extra)
        (tmp / "report.md").write_text(markdown(summary, title, source))
        (tmp / "report.json").write_text(json.dumps({"title": title, "source": source, **summary}, indent=1) + "\n")
        plot(summary, tmp / "report.png")
        write_jsonl(tmp / "diff.jsonl", changed)
        image_of = images or {str(row["id"]): row["image"] for row in rows if row.get("image")}
        (tmp / "diff.html").write_text(diff_page(changed, summary, image_of, tmp, title))

    build_dir(out, write, replace=True)
    return summary


def think_markers() -> set:
    """Every family's think block markers (("<think>", "</think>") for Qwen3 / Qwen3.5)."""
    from kit import families

    return {family.markup.think for family in families.all_families() if family.markup.think}
