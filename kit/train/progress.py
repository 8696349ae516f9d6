"""What a training run shows and does as it goes, through the trainer's callbacks (the checkpoints' own are in
kit/train/checkpoints.py): the token counter behind tokens/s, the progress line with its row in metrics.jsonl,
the checkpoint-then-stop on Ctrl-C or SIGTERM, the commit of a run that --force replaces, and bench.py's clock.

This module imports transformers at its top: import it only after kit.backend.select has chosen the backend
(Unsloth must patch transformers first).
"""

import json
import resource
import signal
import time
from pathlib import Path

import click
import torch
from transformers import TrainerCallback

from kit.train import runfolder
from kit.train.distributed import any_rank, is_main, total
from kit.train.training_log import grpo_values, log_eval


class CountingCollator:
    """Counts the real (non-padding) tokens that pass, for the tokens/s field of the progress line."""

    def __init__(self, collator):
        import multiprocessing

        # shared memory: with dataloader_num_workers > 0 the collator runs in worker processes
        self.collator, self._tokens = collator, multiprocessing.Value("q", 0)

    @property
    def tokens(self) -> int:
        return self._tokens.value

    def __call__(self, samples):
        from kit.inputs.packing import real_tokens

        batch = self.collator(samples)
        with self._tokens.get_lock():
            self._tokens.value += real_tokens(batch)
        return batch


def peak_memory_gb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # peak RSS (Linux reports KiB)


class ProgressLine(TrainerCallback):
    """One fixed-field line per logging step, the same fields in metrics.jsonl. Without a counter (GRPO builds its
    own batches) tokens are the trainer's count of prompt and completion tokens."""

    def __init__(self, path: Path, counter: CountingCollator | None, keep_until: int):
        self.path, self.counter = path, counter
        # On resume, rows logged after the checkpoint are logged again; keep the curve single-valued.
        rows = path.read_text().splitlines() if keep_until and path.exists() else []
        if is_main():  # one writer under torchrun
            path.write_text("".join(r + "\n" for r in rows if r.strip() and json.loads(r)["step"] <= keep_until))
        self.last_time, self.last_step, self.last_tokens, self.last_loss = time.time(), 0, 0, float("nan")
        self.began, self.first_step = time.time(), 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.last_time, self.last_step = time.time(), state.global_step
        self.began, self.first_step = self.last_time, state.global_step  # a resumed run's ETA counts this session

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_log = True  # the last step is always logged: the final loss is the loss at the end

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "eval_loss" in logs:
            log_eval(self.path, state, logs)
        if not logs or "loss" not in logs:
            return
        now, steps = time.time(), max(state.global_step - self.last_step, 1)
        seconds = max(now - self.last_time, 1e-9)
        # every rank logs the same steps: all of them count their tokens
        tokens = total(self.counter.tokens) if self.counter else state.num_input_tokens_seen
        row = {"step": state.global_step, "loss": logs["loss"], "lr": logs.get("learning_rate", 0.0),
               "ms_per_step": 1000 * seconds / steps,
               "tokens_per_s": (tokens - self.last_tokens) / seconds,
               "peak_mem_gb": peak_memory_gb(), "time": now,
               "eta_s": eta_seconds(now - self.began, state.global_step - self.first_step,
                                    state.max_steps - state.global_step)}
        row.update(grpo_values(logs))
        rewards = f" | reward {row['reward']:.3f} ± {row['reward_std']:.3f} | kl {row.get('kl', 0):.4f} | " \
                  f"len {row['completion_length']:.1f}" if "reward" in row else ""
        done = 100 * state.global_step / max(state.max_steps, 1)
        click.echo(f"step {row['step']:05d}/{state.max_steps:05d} ({done:.0f}%) | loss {row['loss']:.4f} | "
                   f"lr {row['lr']:.1e} | {row['ms_per_step']:,.0f} ms | {row['tokens_per_s']:,.0f} tok/s | "
                   f"mem {row['peak_mem_gb']:.1f} GB{rewards} | eta {clock(row['eta_s'])}")
        if is_main():
            with self.path.open("a") as handle:
                handle.write(json.dumps(row) + "\n")
        self.last_time, self.last_step, self.last_tokens = now, state.global_step, tokens
        self.last_loss = row["loss"]


def eta_seconds(elapsed: float, steps_taken: int, steps_left: int) -> float:
    """The time the steps left will take at this session's average pace so far (the first logged steps include
    the trainer's start-up, so early estimates run high and settle)."""
    return elapsed / max(steps_taken, 1) * steps_left


def clock(seconds: float) -> str:
    """12s, 3m05s, 1h02m: the ETA field of the progress line."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class StopOnSignal(TrainerCallback):
    """Ctrl-C or SIGTERM (a preempted Kaggle/cloud job) saves a checkpoint at the end of the step, then stops."""

    def __init__(self):
        self.asked = False
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self.ask)

    def ask(self, signum, frame):
        click.echo(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step, then stopping")
        self.asked = True

    def on_step_end(self, args, state, control, **kwargs):
        # A signal may reach one rank only; all of them must save and stop at the same step.
        if any_rank(self.asked):
            control.should_save = control.should_training_stop = True


class CommitAfterFirstStep(TrainerCallback):
    """The run that --force replaces goes once the new one has taken its first optimizer step."""

    def on_step_end(self, args, state, control, **kwargs):
        runfolder.commit()


class StepTimer(TrainerCallback):
    """bench.py's clock: each step timed from one step's end to the next, since the trainer fetches (and collates)
    a step's batches before on_step_begin and a begin-to-end timer would miss the data time. `counter` and
    `collator` are bench.py's CountingCollator and TimedCollator; peak memory is reset after `warmup` steps."""

    def __init__(self, counter, collator, warmup: int):
        self.counter, self.collator, self.warmup = counter, collator, warmup
        self.cuda = torch.cuda.is_available()
        self.times, self.tokens, self.data_seconds, self.positions = [], [], [], []

    def mark(self):
        if self.cuda:
            torch.cuda.synchronize()
        self.last, self.last_tokens, self.last_data = time.perf_counter(), self.counter.tokens, self.collator.seconds
        self.last_positions = self.collator.positions

    def on_train_begin(self, args, state, control, **kwargs):
        self.mark()

    def on_step_end(self, args, state, control, **kwargs):
        if self.cuda:
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self.last)
        self.tokens.append(self.counter.tokens - self.last_tokens)
        self.data_seconds.append(self.collator.seconds - self.last_data)
        self.positions.append(self.collator.positions - self.last_positions)
        if state.global_step == self.warmup and self.cuda:
            torch.cuda.reset_peak_memory_stats()
        self.mark()


class HostMemoryAtStep(TrainerCallback):
    """bench.py --memory: the resident set at each optimizer step (after the update, before the gradients are
    cleared: weights, adapter, gradients and optimizer states live, activations gone); the largest is kept."""

    def __init__(self):
        self.at_step = 0

    def on_optimizer_step(self, args, state, control, **kwargs):
        from kit.plan import host_memory

        self.at_step = max(self.at_step, host_memory.resident())
