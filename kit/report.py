"""The evaluation report, from scored rows: report.md, report.json, report.png, diff.jsonl and diff.html.

A scored row is one question: {"id", "question", "references", optional "image", "subset", "qtype", and
"systems": {name: {"answer", "relaxed", "exact"}}}; a system that did not answer a question is absent from it.
eval.py makes these rows from a model run, or (`--score`) from prediction files any tool wrote (read_predictions).
"""

import html
import itertools
import json
from pathlib import Path

from kit.cli import jsonl_rows
from kit.errors import UserError
from kit.metrics import (BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, EXACT, METRICS, accuracy, bootstrap_interval,
                         exact_correct, mcnemar_exact, paired_counts, relaxed_correct, split_think)
from kit.paths import build_dir, write_jsonl

GROUPS = ("subset", "qtype")  # ChartQA human/augmented; synthetic question type
SHUFFLED = " (shuffled)"
THUMBNAIL_PIXELS = 160


# --- numbers ----------------------------------------------------------------------------------------------
def score(flags: list[bool]) -> dict:
    """{"accuracy", "low", "high", "right", "samples"}: accuracy and its 95 % bootstrap interval, as fractions."""
    interval = bootstrap_interval(flags)
    return {"accuracy": accuracy(flags), "low": interval and interval[0], "high": interval and interval[1],
            "right": sum(flags), "samples": len(flags)}


def comparison_pairs(names: list[str]) -> list[tuple[str, str]]:
    """(baseline, candidate) pairs: each system against its shuffled-image control, then every two systems in
    the order given (so base before finetuned)."""
    controls = [(name + SHUFFLED, name) for name in names if name + SHUFFLED in names]
    plain = [name for name in names if not name.endswith(SHUFFLED)]
    return controls + list(itertools.combinations(plain, 2))


def paired(rows: list[dict], baseline: str, candidate: str) -> dict:
    """The candidate against the baseline on the same questions: paired counts, the change in accuracy with its
    bootstrap interval, and McNemar's exact p-value."""
    before = [row["systems"][baseline]["relaxed"] for row in rows]
    after = [row["systems"][candidate]["relaxed"] for row in rows]
    counts = paired_counts(before, after)
    change = bootstrap_interval([int(a) - int(b) for a, b in zip(after, before)])
    return {"samples": len(rows), **counts, "change": (counts["fixed"] - counts["broken"]) / len(rows),
            "change_low": change[0], "change_high": change[1],
            "mcnemar_p": mcnemar_exact(counts["fixed"], counts["broken"])}


def summarize(rows: list[dict], names: list[str], metric: str, seconds: dict | None = None) -> dict:
    """Every number of the report (what report.json holds)."""
    systems = {}
    for name in names:
        answered = [row for row in rows if name in row["systems"]]
        entry = {"samples": len(answered),
                 "relaxed": score([row["systems"][name]["relaxed"] for row in answered]),
                 "exact": score([row["systems"][name]["exact"] for row in answered]), "groups": {},
                 # replies that began with a think block, scored on what followed it (eval.py takes it off)
                 "think_blocks": sum("think" in row["systems"][name] for row in answered)}
        for key in GROUPS:
            for group in sorted({str(row[key]) for row in answered if row.get(key) is not None}):
                members = [row for row in answered if str(row.get(key)) == group]
                entry["groups"].setdefault(key, {})[group] = {
                    "samples": len(members), "relaxed": score([row["systems"][name]["relaxed"] for row in members]),
                    "exact": score([row["systems"][name]["exact"] for row in members])}
        if seconds and name in seconds:
            entry["seconds_per_sample"] = seconds[name]
        systems[name] = entry
    pairs = []
    for baseline, candidate in comparison_pairs(names):
        both = [row for row in rows if baseline in row["systems"] and candidate in row["systems"]]
        if both:
            pairs.append({"baseline": baseline, "candidate": candidate, **paired(both, baseline, candidate),
                          "groups": {key: {group: paired([row for row in both if str(row.get(key)) == group],
                                                         baseline, candidate)
                                           for group in sorted({str(row[key]) for row in both
                                                                if row.get(key) is not None})}
                                     for key in GROUPS if any(row.get(key) is not None for row in both)}})
    return {"metric": metric, "rules": {"relaxed": METRICS[metric], "exact": EXACT},
            "interval": {"method": "percentile bootstrap over questions", "level": 0.95,
                         "resamples": BOOTSTRAP_RESAMPLES, "seed": BOOTSTRAP_SEED},
            "samples": len(rows), "systems": systems, "pairs": pairs}


# --- report.md ----------------------------------------------------------------------------------------------
def percent(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def cell(entry: dict) -> str:
    """"70.5 [64.0, 76.5]": accuracy and its interval, in %."""
    if entry["accuracy"] is None:
        return "-"
    return f"{percent(entry['accuracy'])} [{percent(entry['low'])}, {percent(entry['high'])}]"


def table(summary: dict) -> str:
    """The systems table: relaxed accuracy and exact match overall, relaxed accuracy per group."""
    metric, systems = summary["metric"], summary["systems"]
    groups = sorted({(key, group) for entry in systems.values() for key, members in entry["groups"].items()
                     for group in members}, key=lambda kg: (GROUPS.index(kg[0]), kg[1]))
    timed = any("seconds_per_sample" in entry for entry in systems.values())
    header = ["system", f"relaxed acc ({metric})", "exact match"] + [f"{k}={g} ({metric})" for k, g in groups] + \
             ["samples"] + (["s/sample"] if timed else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, entry in systems.items():
        cells = [name, cell(entry["relaxed"]), cell(entry["exact"])]
        for key, group in groups:
            member = entry["groups"].get(key, {}).get(group)
            cells.append(cell(member["relaxed"]) if member else "-")
        cells.append(str(entry["samples"]))
        if timed:
            cells.append(f"{entry['seconds_per_sample']:.3f}" if "seconds_per_sample" in entry else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pairs_table(summary: dict) -> str:
    header = ["baseline", "candidate", "samples", "fixed", "broken", "both right", "both wrong",
              "change (points)", "McNemar p"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += [pair_line([pair["baseline"], pair["candidate"]], pair) for pair in summary["pairs"]]
    return "\n".join(lines)


def group_pairs_table(summary: dict) -> str:
    """The same paired comparisons within each question type / subset; "" when the questions have none."""
    header = ["group", "baseline", "candidate", "samples", "fixed", "broken", "both right", "both wrong",
              "change (points)", "McNemar p"]
    lines = [pair_line([f"{key}={group}", pair["baseline"], pair["candidate"]], counts)
             for pair in summary["pairs"] for key, members in pair.get("groups", {}).items()
             for group, counts in members.items()]
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *lines]) if lines else ""


def pair_line(names: list[str], pair: dict) -> str:
    change = f"{100 * pair['change']:+.1f} [{100 * pair['change_low']:+.1f}, {100 * pair['change_high']:+.1f}]"
    return "| " + " | ".join([*names, str(pair["samples"]), str(pair["fixed"]), str(pair["broken"]),
                              str(pair["both_right"]), str(pair["both_wrong"]), change,
                              f"{pair['mcnemar_p']:.3g}"]) + " |"


def tables(summary: dict) -> str:
    """What eval.py prints at the end: the systems table, then the paired comparisons."""
    by_group = group_pairs_table(summary)
    return table(summary) + ("\n\n" + pairs_table(summary) if summary["pairs"] else "") + \
        ("\n\n" + by_group if by_group else "")


def markdown(summary: dict, title: str, source: str) -> str:
    interval = summary["interval"]
    text = [f"# {title}", "",
            f"{source}. Each cell: accuracy in % and its 95 % interval [low, high], a percentile bootstrap over the "
            f"questions ({interval['resamples']:,} resamples, seed {interval['seed']}).", "",
            f"- `relaxed acc ({summary['metric']})` and every `subset=` / `qtype=` column: relaxed accuracy under "
            f"{summary['rules']['relaxed']}.",
            f"- `exact match`: {EXACT.split(': ', 1)[1]}.", "", table(summary)]
    scores = [entry[kind] for entry in summary["systems"].values() for kind in ("relaxed", "exact")]
    if any(score["accuracy"] in (0, 1) for score in scores):
        text += ["", "A system right on none (or all) of the questions has a zero-width bootstrap interval: every "
                 "resample is the same. Read it with the rule of three: with n questions, the true rate is below "
                 "3/n (or above 1 - 3/n) at 95 %."]
    if summary["pairs"]:
        text += ["", "## Paired comparisons (same questions, relaxed accuracy)", "",
                 "fixed: the candidate is right where the baseline was wrong; broken: the reverse. change: candidate "
                 "minus baseline in points, with its paired bootstrap interval. McNemar p: exact two-sided binomial "
                 "test of fixed against broken (small p: the difference is unlikely to be chance).", "",
                 pairs_table(summary)]
    by_group = group_pairs_table(summary)
    if by_group:
        text += ["", "The same comparisons within each question type or subset:", "", by_group]
    return "\n".join(text) + "\n"


# --- report.png ---------------------------------------------------------------------------------------------
def plot(summary: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary["systems"])
    entries = [summary["systems"][name]["relaxed"] for name in names]
    scores = [100 * (e["accuracy"] or 0) for e in entries]
    errors = [[100 * ((e["accuracy"] or 0) - (e["low"] or 0)) for e in entries],
              [100 * ((e["high"] or 0) - (e["accuracy"] or 0)) for e in entries]]
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 2, 3.8), dpi=100)
    colors = ["lightgray" if name.endswith(SHUFFLED) else "tab:blue" for name in names]
    ax.bar(range(len(names)), scores, color=colors, yerr=errors, capsize=6, ecolor="black")
    for i, value in enumerate(scores):  # right of the whisker, so the two never overlap
        ax.text(i + 0.06, value + 1, f"{value:.1f}", ha="left", va="bottom")
    ax.set_xticks(range(len(names)), names, rotation=15)
    ax.set_ylabel(f"relaxed accuracy, {summary['metric']} rule (%)")
    ax.set_ylim(0, 105)
    ax.set_title(f"{summary['samples']} questions; whiskers: 95 % bootstrap interval", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --- diff.jsonl and diff.html -------------------------------------------------------------------------------
def diff_rows(rows: list[dict], summary: dict) -> list[dict]:
    """Every question whose relaxed verdict changed between a pair's baseline and candidate."""
    changed = []
    for pair in summary["pairs"]:
        baseline, candidate = pair["baseline"], pair["candidate"]
        for row in rows:
            if baseline not in row["systems"] or candidate not in row["systems"]:
                continue
            before, after = row["systems"][baseline], row["systems"][candidate]
            if before["relaxed"] != after["relaxed"]:
                changed.append({"baseline": baseline, "candidate": candidate,
                                "change": "fixed" if after["relaxed"] else "broken",
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


def diff_page(changed: list[dict], pairs: list[dict], images: dict, folder: Path, title: str) -> str:
    """diff.html: per pair, the questions the candidate fixed and those it broke, each with its chart."""
    (folder / "thumbs").mkdir(exist_ok=True)
    made: dict[str, str | None] = {}
    parts = [f"<!doctype html><meta charset=utf-8><title>{html.escape(title)}: what changed</title>",
             "<style>body{font-family:sans-serif;margin:1.5em}td{vertical-align:top;padding:4px 10px;"
             "border-bottom:1px solid #ddd}.fixed{color:#1a7f37}.broken{color:#cf222e}</style>",
             f"<h1>{html.escape(title)}: what changed</h1>",
             "<p>Relaxed-accuracy verdicts that differ between two systems on the same question. Shuffled-image "
             "systems were shown another question's chart; the thumbnail is the question's own.</p><ul>"]
    parts += [f"<li>{html.escape(p['candidate'])} vs {html.escape(p['baseline'])}: <a href='#{i}-fixed'>fixed "
              f"{p['fixed']}</a>, <a href='#{i}-broken'>broken {p['broken']}</a></li>" for i, p in enumerate(pairs)]
    parts.append("</ul>")
    for i, (baseline, candidate) in enumerate((pair["baseline"], pair["candidate"]) for pair in pairs):
        group = [d for d in changed if (d["baseline"], d["candidate"]) == (baseline, candidate)]
        for change in ("fixed", "broken"):
            members = [d for d in group if d["change"] == change]
            parts.append(f"<h2 id={i}-{change}>{html.escape(candidate)} vs {html.escape(baseline)}: "
                         f"<span class={change}>{change}</span> ({len(members)})</h2>")
            if not members:
                continue
            parts.append(f"<table><tr><th>chart</th><th>question</th><th>reference</th>"
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
         seconds: dict | None = None, images: dict | None = None, extra_files: dict | None = None) -> dict:
    """Write every report file into `out` (through a temporary folder renamed at the end; the caller has
    checked that `out` may be replaced). `images`: {row id: path or PIL image} for thumbnails.
    `extra_files`: {file name: rows} also written as JSONL. Returns the summary."""
    summary = summarize(rows, names, metric, seconds)
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
        (tmp / "diff.html").write_text(diff_page(changed, summary["pairs"], image_of, tmp, title))

    build_dir(out, write, replace=True)
    return summary


# --- prediction files from any tool (eval.py --score) -------------------------------------------------------
def references_of(row: dict) -> list[str] | None:
    """The row's reference answers: "answers", "answer", or the last assistant turn of "messages"."""
    if isinstance(row.get("answers"), list) and row["answers"]:
        return [str(a) for a in row["answers"]]
    if row.get("answer") is not None and not isinstance(row["answer"], (list, dict)):
        return [str(row["answer"])]
    for message in reversed(row.get("messages") or []):
        if isinstance(message, dict) and message.get("role") == "assistant":
            content = message.get("content")
            parts = content if isinstance(content, list) else [{"type": "text", "text": content}]
            text = " ".join(str(p.get("text") or "") for p in parts if isinstance(p, dict) and p.get("type") == "text")
            return [text] if text else None
    return None


def question_of(row: dict) -> str | None:
    if row.get("question") is not None:
        return str(row["question"])
    for message in reversed(row.get("messages") or []):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            parts = content if isinstance(content, list) else [{"type": "text", "text": content}]
            return " ".join(str(p.get("text") or "") for p in parts if isinstance(p, dict) and p.get("type") == "text")
    return None


def think_markers() -> set:
    """Every family's think block markers (("<think>", "</think>") for Qwen3 / Qwen3.5)."""
    from kit import families

    return {family.markup.think for family in families.all_families() if family.markup.think}


def score_file(spec: str) -> tuple[str | None, Path]:
    """(label, path) of an eval.py --score argument: FILE, or LABEL=FILE to name the file's system LABEL (two
    runs' predictions.jsonl both call theirs `finetuned`)."""
    label, _, rest = spec.partition("=")
    if rest and "/" not in label and not Path(spec).exists():
        return label, Path(rest)
    return None, Path(spec)


def row_answers(row: dict, where: str, path: Path, label: str | None) -> tuple[dict, dict, list[str]]:
    """({system: answer}, {system: think block}, references) of one --score row; `label` names its system."""
    thoughts = {}
    if isinstance(row.get("systems"), dict) and "references" in row:  # eval.py's predictions.jsonl
        answers = {name: verdict.get("answer", "") for name, verdict in row["systems"].items()}
        thoughts = {name: verdict["think"] for name, verdict in row["systems"].items() if "think" in verdict}
        references = [str(r) for r in row["references"]]
    else:
        if "prediction" not in row:
            raise UserError(f"{where}: no \"prediction\"; a row needs the system's answer as \"prediction\" "
                            "and the reference as \"answer\", \"answers\" or \"messages\"")
        references = references_of(row)
        answers = {str(row.get("system") or path.name.removesuffix(".jsonl")): row["prediction"]}
    if not references:
        raise UserError(f"{where}: no reference answer; give \"answer\", \"answers\" (a list) or "
                        "\"messages\" with an assistant turn")
    if label:
        renamed = {name: label if len(answers) == 1 else f"{label} {name}" for name in answers}
        answers = {renamed[name]: answer for name, answer in answers.items()}
        thoughts = {renamed[name]: thought for name, thought in thoughts.items()}
    return answers, thoughts, references


def read_predictions(paths: list[Path], metric: str, labels=()) -> tuple[list[dict], list[str]]:
    """Scored rows and system names from prediction files. A row is {"prediction", "answer" | "answers" |
    "messages" (its last assistant turn is the reference), optional "system" (default: the file's name), "id",
    "question", "image" / "images" (relative to the file), "subset", "qtype"}, or a row of eval.py's own
    predictions.jsonl (re-judged under `metric`). `labels[i]`, when given, names path i's system (its systems
    "LABEL NAME" when it holds several). Systems are paired on "id", else on image + question, else on the row's
    position among its system's rows."""
    by_key: dict[str, dict] = {}
    names: list[str] = []
    for index, path in enumerate(paths):
        label = labels[index] if index < len(labels) else None
        seen: dict[tuple, int] = {}
        for line, where, row in jsonl_rows(path, "--score"):
            answers, thoughts, references = row_answers(row, where, path, label)
            image = row.get("image") or (row.get("images") or [None])[0]
            if isinstance(image, str) and not Path(image).is_absolute():
                image = str(path.parent / image)
            question = question_of(row)
            for name, prediction in answers.items():
                if row.get("id") is not None:
                    base = ("id", str(row["id"]))
                elif question is not None:
                    base = ("question", str(image), question)
                else:
                    base = ("position",)
                nth = seen.get((name, *base), 0)
                seen[(name, *base)] = nth + 1
                if base[0] == "id" and nth:
                    raise UserError(f"{where}: id {row['id']!r} appears twice for system {name!r}; ids must be "
                                    "unique within a system")
                key = json.dumps([*base, nth])
                entry = by_key.setdefault(key, {
                    "id": str(row["id"]) if row.get("id") is not None else f"{path.name}:{line}",
                    **({"question": question} if question is not None else {}),
                    **({"image": image} if isinstance(image, str) else {}),
                    **{k: row[k] for k in GROUPS if row.get(k) is not None},
                    "references": references, "systems": {}})
                if entry["references"] != references:
                    raise UserError(f"{where}: question {entry['id']!r} has references {references} here but "
                                    f"{entry['references']} in an earlier row; the systems must answer the same "
                                    "questions")
                if name in entry["systems"]:
                    raise UserError(f"{where}: system {name!r} answers question {entry['id']!r} twice")
                if name not in names:
                    names.append(name)
                # scored after any think block, as eval.py scores its own answers (which it kept apart)
                thought, prediction = split_think("" if prediction is None else str(prediction), think_markers())
                thought = thoughts.get(name, thought)
                entry["systems"][name] = {"answer": prediction,
                                          "relaxed": relaxed_correct(prediction, references, metric),
                                          "exact": exact_correct(prediction, references),
                                          **({"think": thought} if thought is not None else {})}
    if not by_key:
        raise UserError(f"--score {', '.join(map(str, paths))}: no rows")
    return list(by_key.values()), names
