"""The training log, metrics.jsonl: the fields GRPO adds to it, its evaluation rows, a run's summary from it and
its loss curve. kit/train/progress.py writes its training rows as the run goes.

No transformers here: the board draws loss curves with this module.
"""

import json
import time
from pathlib import Path

import click

# GRPO's logged values (TRL's names) -> metrics.jsonl fields: the group reward, its spread, the share of groups
# whose answers all scored the same (no advantage, so no learning signal), the KL to the starting model and the
# answers' length; each reward's own mean is added as reward_<name>.
GRPO_FIELDS = {"reward": "reward", "reward_std": "reward_std", "frac_reward_zero_std": "frac_reward_zero_std",
               "kl": "kl", "completions/mean_length": "completion_length"}


def grpo_values(logs: dict) -> dict:
    """The GRPO fields of one logging step (none for SFT): GRPO_FIELDS, and reward_<name> per reward function."""
    values = {field: logs[key] for key, field in GRPO_FIELDS.items() if logs.get(key) is not None}
    for key, value in logs.items():
        if key.startswith("rewards/") and key.endswith("/mean") and value is not None:
            values[f"reward_{key.split('/')[1]}"] = value
    return values


def summary(path: Path, resumed_at: int = 0) -> tuple[float, float]:
    """(the last logged loss, seconds spent training up to step `resumed_at` in earlier sessions), from
    metrics.jsonl, so that a resumed run reports the whole run and not only its last part."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    rows = [row for row in rows if "loss" in row]  # eval rows (eval_loss) carry no training step time
    earlier, previous = 0.0, 0
    for row in rows:
        if row["step"] <= resumed_at:
            earlier += (row["step"] - previous) * row["ms_per_step"] / 1000
            previous = row["step"]
    return (rows[-1]["loss"] if rows else float("nan")), earlier


def log_eval(path: Path, state, logs: dict):
    """The held-out evaluation's line and metrics.jsonl row (rows with eval_loss; training rows have loss)."""
    from kit.evaluate import task_metrics

    metric = next((name for name in task_metrics.METRICS if f"eval_{name}" in logs), None)  # the recipe's
    row = {"step": state.global_step, "eval_loss": logs["eval_loss"],
           **({"eval_metric": metric, f"eval_{metric}": logs[f"eval_{metric}"]} if metric else {}),
           "eval_questions": logs.get("eval_questions"), "eval_seconds": logs.get("eval_runtime"), "time": time.time()}
    accuracy = "" if metric is None else \
        f" | {task_metrics.label(metric)} {100 * row[f'eval_{metric}']:.1f} % of {row['eval_questions']} held-out " \
        "questions"
    click.echo(f"eval {row['step']:05d}/{state.max_steps:05d} | eval loss {row['eval_loss']:.4f}{accuracy} | "
               f"{row['eval_seconds'] or 0:.0f} s")
    with path.open("a") as handle:
        handle.write(json.dumps(row) + "\n")


def plot_loss(metrics_path: Path, png_path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    every = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    rows, evals = [r for r in every if "loss" in r], [r for r in every if "eval_loss" in r]
    rewarded = [r for r in rows if "reward" in r]
    panels = 1 + bool(evals) + bool(rewarded)
    fig, axes = plt.subplots(1, panels, figsize=(6 + 5 * (panels - 1), 3.5), dpi=100, squeeze=False)
    ax = axes[0][0]
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], marker=".")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    if evals:  # second panel: held-out loss, and the task's metric on its own axis
        ax = axes[0][1]
        steps = [r["step"] for r in evals]
        ax.plot(steps, [r["eval_loss"] for r in evals], marker="o", color="tab:orange", label="held-out loss")
        ax.set_xlabel("step")
        ax.set_ylabel("held-out loss")
        ax.grid(alpha=0.3)
        scored = [r for r in evals if r.get("eval_metric")]
        if scored:
            from kit.evaluate import task_metrics

            metric = scored[-1]["eval_metric"]
            right = ax.twinx()
            right.plot([r["step"] for r in scored], [100 * r[f"eval_{metric}"] for r in scored],
                       marker="s", color="tab:green")
            right.set_ylabel(f"{task_metrics.label(metric)} % ({scored[-1].get('eval_questions')} questions)",
                             color="tab:green")
    if rewarded:
        plot_rewards(axes[0][-1], rewarded)
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)


def plot_rewards(ax, rows: list[dict]):
    """The GRPO panel: mean reward with its spread over the group's answers, and each reward function's mean."""
    steps = [r["step"] for r in rows]
    mean = [r["reward"] for r in rows]
    spread = [r.get("reward_std", 0.0) for r in rows]
    ax.plot(steps, mean, marker=".", color="tab:purple", label="reward (weighted sum)")
    ax.fill_between(steps, [m - s for m, s in zip(mean, spread)], [m + s for m, s in zip(mean, spread)],
                    color="tab:purple", alpha=0.15, label="± std")
    for key in sorted({k for r in rows for k in r if k.startswith("reward_") and k != "reward_std"}):
        ax.plot([r["step"] for r in rows if key in r], [r[key] for r in rows if key in r], linestyle="--",
                label=key.removeprefix("reward_"))
    ax.set_xlabel("step")
    ax.set_ylabel("GRPO reward")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
