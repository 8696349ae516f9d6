"""What board.py needs to run the scripts and read their run folders, without importing any script.

Training runs are started detached (their own session, output to a log file), so they outlive the page and the
board; the board finds them again from the run folder and the process table. Everything else (eval, merge,
infer) runs attached and is streamed line by line, or character by character for a chat answer.
"""

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from kit import run_checks

ROOT = Path(__file__).resolve().parents[2]
WEIGHTS = ("model.safetensors", "adapter_model.safetensors")


def command(script: str, *args) -> list[str]:
    """The exact command a user would type, run with this Python (-u: lines arrive as they are printed)."""
    return [sys.executable, "-u", str(ROOT / script), *map(str, args)]


def shown(cmd: list[str]) -> str:
    """`cmd` as the user would type it in the repository: python train.py ..."""
    return shlex.join(["python", Path(cmd[2]).name, *[_relative(a) for a in cmd[3:]]])


def _relative(arg: str) -> str:
    try:
        return str(Path(arg).relative_to(Path.cwd())) if os.path.isabs(arg) else arg
    except ValueError:
        return arg


def log_path(run_dir: Path) -> Path:
    """train.log in the run folder; before train.py has made the folder (it refuses a non-empty one), the log
    waits beside it as .NAME.train.log and moves in once run_config.json is there (the open file moves with it)."""
    inside, waiting = run_dir / "train.log", run_dir.parent / f".{run_dir.name}.train.log"
    if waiting.exists() and (run_dir / "run_config.json").exists():
        if inside.exists():  # a resumed run: keep the earlier part
            with inside.open("a") as handle:
                handle.write(waiting.read_text())
            waiting.unlink()
        else:
            waiting.replace(inside)
    return inside if inside.exists() or holds_run(run_dir) and not waiting.exists() else waiting


def holds_run(run_dir: Path) -> bool:
    """Whether a run is in the folder: anything but the plan.json that train.py --plan writes there first."""
    return run_dir.is_dir() and any(p.name != "plan.json" for p in run_dir.iterdir())


def start_training(cmd: list[str], run_dir: Path) -> int:
    """Start train.py detached: a new session (closing the page or the board does not stop it), its output
    appended to the run's log after the command line itself."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log = log_path(run_dir)
    with log.open("a") as handle:
        handle.write(f"$ {shown(cmd)}\n")
        handle.flush()
        process = subprocess.Popen(cmd, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return process.pid


def training_pid(run_dir: Path) -> int | None:
    """The live train.py process writing `run_dir` (started here or from a shell), from /proc."""
    target = run_dir.resolve()
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            args = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            if not any(a.endswith("train.py") for a in args) or (entry / "stat").read_text().split()[2] == "Z":
                continue
            cwd = Path(os.readlink(entry / "cwd"))
        except OSError:
            continue
        for flag in ("--output", "--resume"):
            if flag in args[:-1] and (cwd / args[args.index(flag) + 1]).resolve() == target:
                return int(entry.name)
    return None


def stop_training(run_dir: Path) -> bool:
    """SIGTERM: train.py saves a checkpoint at the end of the step, then stops."""
    pid = training_pid(run_dir)
    if pid:
        os.kill(pid, signal.SIGTERM)
    return pid is not None


CHECKPOINT_MARKER = "complete.json"  # kit/train/checkpoints.MARKER (that module imports transformers: not here)


def checkpoints(run_dir: Path) -> list[Path]:
    """The complete checkpoints (marked by kit/train/checkpoints.py), oldest first."""
    done = [p for p in (run_dir / "checkpoints").glob("checkpoint-*") if (p / CHECKPOINT_MARKER).exists()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def state(run_dir: Path) -> str:
    if training_pid(run_dir):
        return "running"
    if any((run_dir / name).exists() for name in WEIGHTS):
        return "done"
    if checkpoints(run_dir):
        return "stopped (checkpoint)"
    return "failed"


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # a line being written right now
            rows.append(json.loads(line))
    return rows


def runs(root: Path) -> list[dict]:
    """Every run folder under `root` (one with run_config.json, or a run that is starting), newest first."""
    found = {p.parent for p in root.glob("*/run_config.json")}
    found |= {root / p.name[1:-len(".train.log")] for p in root.glob(".*.train.log")}
    rows = []
    for run_dir in found:
        last = (metrics(run_dir) or [{}])[-1]
        exists = (run_dir / "run_config.json").exists()
        now = state(run_dir) if exists else ("running" if training_pid(run_dir) else "failed")
        damaged = run_checks.problem(run_dir, finished=now == "done") if exists else None
        saved = {} if damaged or not exists else json.loads((run_dir / "run_config.json").read_text())
        steps = saved.get("recipe", {}).get("max_steps", "")
        log = log_path(run_dir)
        rows.append({"run": run_dir.name, "state": f"damaged: {damaged}" if damaged else now,
                     "step": f"{last.get('step', 0)}/{steps}", "loss": round(last["loss"], 4) if "loss" in last else "",
                     "updated": time.strftime("%H:%M:%S", time.localtime(log.stat().st_mtime)) if log.exists() else "",
                     "mtime": log.stat().st_mtime if log.exists() else 0})
    return sorted(rows, key=lambda r: -r["mtime"])


def tail(path: Path, lines: int = 40) -> str:
    if not path.exists():
        return ""
    text = path.read_text(errors="replace").replace("\r", "\n")  # tqdm bars redraw with \r
    return "\n".join([line for line in text.splitlines() if line.strip()][-lines:])


def stream(cmd: list[str], chars: bool = False):
    """Run `cmd` attached and yield its output so far, growing; the last item is (output, exit code)."""
    process = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=0,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    output = b""
    try:
        while chunk := (os.read(process.stdout.fileno(), 256) if chars else process.stdout.readline()):
            output += chunk
            yield output.decode(errors="replace"), None
    finally:
        if process.poll() is None:  # the page went away mid-run: do not leave it behind
            process.terminate()
        process.wait()
    yield output.decode(errors="replace"), process.returncode


def run_names(root: Path) -> list[str]:
    return [row["run"] for row in runs(root) if (root / row["run"] / "run_config.json").exists()]


def chat_targets(root: Path) -> list[str]:
    """Run folders and the folders merge.py wrote beside them (merged weights, GGUF pairs)."""
    folders = [p for p in sorted(root.glob("*")) if p.is_dir() and not p.name.startswith(".")]
    return [str(p) for p in folders if (p / "run_config.json").exists() or list(p.glob("*.gguf"))]


def loss_plot(run_dir: Path) -> str | None:
    """metrics.jsonl drawn as train.py draws loss.png at the end, for a run still going."""
    rows = metrics(run_dir)
    if not rows:
        return None
    import tempfile

    from kit.train.training_log import plot_loss

    stamp = (run_dir / "metrics.jsonl").stat().st_mtime_ns
    png = Path(tempfile.gettempdir()) / "qwen2vl-board" / f"{run_dir.name}-{stamp}-loss-{len(rows)}.png"
    if not png.exists():
        png.parent.mkdir(exist_ok=True)
        plot_loss(run_dir / "metrics.jsonl", png)
    return str(png)


def read_json(path: Path) -> dict | None:
    """A file a script wrote (plan.json, export.json), or None when it is not there."""
    return json.loads(path.read_text()) if path.is_file() else None


def deployed_scores(evaluation: dict) -> list[str]:
    """eval.py's scores of the exported systems (merged, gguf:QUANT) against the run as trained, one line each."""
    from kit.evaluate.exported import is_deployed

    systems = evaluation.get("systems", {})
    if "finetuned" not in systems or not any(is_deployed(name) for name in systems):
        return []
    lines = [f"- eval.py on {evaluation['samples']} questions: as trained (finetuned) "
             f"{relaxed_percent(systems['finetuned'])}"]
    for pair in evaluation.get("pairs", []):
        if pair["baseline"] == "finetuned" and is_deployed(pair["candidate"]):
            lines.append(f"  - {pair['candidate']} {relaxed_percent(systems[pair['candidate']])}: "
                         f"fixed {pair['fixed']}, broken {pair['broken']} against as trained "
                         f"(McNemar p {pair['mcnemar_p']:.2g})")
    return lines


def relaxed_percent(system: dict) -> str:
    return f"{100 * system['relaxed']['accuracy']:.1f} %"


def plan_text(plan: dict) -> str:
    """plan.json (train.py --plan) as the board shows it."""
    gib = 1024**3
    lines = [f"{plan['rows']} rows, {plan['steps_per_epoch']} steps per epoch"]
    for kind, values in plan["tokens"].items():
        lines.append(f"{kind + ' tokens':>13}: min {values['min']} | median {values['median']} | p95 {values['p95']} "
                     f"| max {values['max']}")
    lines.append(f"over max_length ({plan['max_length']}): {plan['over_max_length']} sample(s); other problems: "
                 f"{plan['other_problems']}")
    lines += [f"  {finding['place']}: {finding['problem']}" for finding in plan["findings"][:10]]
    lines.append(f"suggested max_pixels: {plan['suggested_max_pixels']} (now {plan['max_pixels']}), for p95 under "
                 f"{plan['image_token_budget']} image tokens")
    lines.append(f"peak GPU memory estimate ({plan['model']}, {'4-bit' if plan['load_in_4bit'] else '16-bit'}, "
                 f"batch {plan['per_device_train_batch_size']}, {plan['precision']}):")
    lines += [f"  {part:<42} {value / gib:.1f} GB" for part, value in plan["memory_bytes"].items()]
    gpu = plan["gpu"]
    if plan["fits"] is None:
        lines.append("no GPU here: name one with --gpu to check the fit")
    else:
        lines.append(f"{'fits' if plan['fits'] else 'does not fit'}: {plan['memory_bytes']['total'] / gib:.1f} GB "
                     f"of {gpu['bytes'] / gib:.1f} GB on {gpu['name']}")
    for strategy, value in plan["per_gpu_bytes"].items():
        lines.append(f"  on {plan['gpus']} GPUs, {strategy}: {value / gib:.1f} GB per GPU")
    return "\n".join(lines)


def export_view(export: dict, evaluation: dict | None = None) -> tuple[str, str]:
    """export.json (merge.py) as the board shows it: (what was proven, as markdown; the llama.cpp commands).
    `evaluation`: the run's eval report.json, whose merged / gguf scores (eval.py --compare finetuned,merged,gguf)
    are shown beside it."""
    parity = export["parity"]
    unmerged = "LoRA adapter on the 16-bit base" if export["finetune"] == "lora" else "run's model"
    lines = [f"- parity, {unmerged} vs the reloaded merged model on {parity['num_samples']} fixed charts "
             f"({parity['prompts']}): max |logit difference| {parity['max_abs_logit_diff']:.2e}; identical greedy "
             f"answers {parity['identical_answers']}/{parity['num_samples']}"]
    as_trained = export.get("as_trained")
    if as_trained:
        lines.append(f"- as trained (4-bit base + adapter) vs the merged 16-bit model on {as_trained['prompts']}: "
                     f"identical greedy answers {as_trained['identical_answers']}/{as_trained['num_samples']}; max "
                     f"|logit difference| {as_trained['max_abs_logit_diff']:.2e}")
    lines += deployed_scores(evaluation or {})
    gguf = export.get("gguf") or {}
    for quant, kinds in (gguf.get("verification") or {}).items():
        for kind, result in kinds.items():
            tokens = len(result["hf_tokens"])
            agree = f"{tokens}/{tokens} the merged model's" if result["agree"] else \
                f"part from the merged model's at {result['first_divergence']} of {tokens}"
            prompt = (f"same {result['prompt_tokens']} prompt tokens, max |logit diff| "
                      f"{result['max_abs_logit_diff']:.1e}" if result["prompt_identical"] else "PROMPT TOKENS DIFFER")
            lines.append(f"- llama.cpp {gguf['models'][quant]}, {kind} prompt: {prompt}; answer "
                         f"{result['llama_cpp_answer']!r}; greedy tokens {agree}")
    for quantized in (gguf.get("quantization") or {}).values():
        if quantized.get("note"):
            lines.append(f"- note: {quantized['note']}")
    outputs = ", ".join(f"{target} in `{folder}`" for target, folder in export["outputs"].items())
    commands = "\n".join(shlex.join(command) for command in export["llama_cpp_commands"].values())
    return f"**Exported** ({outputs}); the checks merge.py ran:\n\n" + "\n".join(lines), commands
