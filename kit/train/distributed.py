"""Several processes, one run: what train.py needs to run under torchrun or `accelerate launch`.

Every rank runs the same script. Rank 0 prepares the data first (the others then read its cache), prints,
and writes the run folder; the others train their shard of each batch and stay quiet. The launcher's
environment (WORLD_SIZE, RANK, LOCAL_RANK, ACCELERATE_*) is the only input, so a plain `python train.py`
is a world of one and every function here is then a no-op.

    torchrun --nproc_per_node 2 train.py --recipe demo
    accelerate launch --config_file configs/ddp.yaml --num_processes 2 train.py --recipe demo
"""

import contextlib
import os
import sys
from datetime import timedelta

from kit.errors import UserError

# transformers' default ddp_timeout: a rank waiting longer than this at a collective gives up.
TIMEOUT = timedelta(minutes=30)


def world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def launcher() -> str:
    """Who started this process: accelerate (its launchers export ACCELERATE_MIXED_PRECISION), torchrun
    (TORCHELASTIC_RUN_ID), plain python, or another launcher that sets WORLD_SIZE."""
    if "ACCELERATE_MIXED_PRECISION" in os.environ:
        return "accelerate"
    if "TORCHELASTIC_RUN_ID" in os.environ:
        return "torchrun"
    return "python" if world() == 1 else "other"


def strategy() -> str:
    """ddp, fsdp or deepspeed (set by an accelerate config), or single for one process."""
    if world() == 1:
        return "single"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        return "deepspeed"
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return "fsdp"
    return "ddp"


def describe(recipe: dict) -> dict:
    """The launch as run_config.json records it."""
    batch = recipe["per_device_train_batch_size"] * recipe["gradient_accumulation_steps"]
    return {"launcher": launcher(), "world_size": world(), "strategy": strategy(), "global_batch": batch * world()}


def relaunch() -> str:
    """The command that starts train.py the way this run was started, for messages like "resume with"."""
    if world() == 1:
        return "python train.py"
    if launcher() == "torchrun":
        nodes = world() // int(os.environ.get("LOCAL_WORLD_SIZE", world()))
        return (f"torchrun --nproc_per_node {os.environ.get('LOCAL_WORLD_SIZE', world())} train.py" if nodes == 1
                else "torchrun <the same --nnodes/--rdzv flags> train.py")
    if launcher() == "accelerate":
        return f"accelerate launch <the same --config_file> --num_processes {world()} train.py"
    return "<the same launcher> train.py"


def prepare():
    """First thing in train.py, before any library is imported: launches that would silently train something
    else than asked end here in one line; replica ranks go quiet (their output is rank 0's, line for line)."""
    if world() > 1 and not is_main():
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115  (stays open for the life of the process)
        os.environ["TRANSFORMERS_VERBOSITY"] = "error"  # read when transformers is first imported
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # transformers' own progress bars follow it
        import logging
        import warnings

        logging.disable(logging.WARNING)
        warnings.simplefilter("ignore")
    if world() > 1 and launcher() in ("torchrun", "accelerate") and sys.platform == "linux":
        # torchrun starts workers in their own session: a launcher killed with -9 would leave them training
        # on, unseen. SIGTERM when it dies makes them checkpoint at the end of the step and stop instead.
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    if strategy() in ("fsdp", "deepspeed"):
        import torch

        if not torch.cuda.is_available():
            # accelerate 1.15 turns FSDP and DeepSpeed on for GPU process groups only: on the CPU (MULTI_CPU)
            # it would quietly run plain DDP under a config that says otherwise
            raise UserError(f"{strategy()} needs CUDA GPUs (accelerate does not shard on the CPU); on this "
                            "machine use configs/ddp.yaml: accelerate launch --config_file configs/ddp.yaml "
                            f"--num_processes {world()} train.py ...")
    if (os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true" and "MASTER_ADDR" in os.environ
            and "WORLD_SIZE" not in os.environ):
        # `accelerate launch --cpu --num_processes N` starts ONE process (its multi-CPU mode runs through mpirun)
        raise UserError("accelerate launch --cpu started a single process, not the --num_processes asked for; "
                        "on the CPU use: accelerate launch --config_file configs/ddp.yaml --num_processes N "
                        "train.py ... (or torchrun --nproc_per_node N train.py ...)")


def init(recipe: dict):
    """Join the process group before any work, so that rank 0 can prepare the data while the others wait.

    transformers makes its own accelerate PartialState later (in TrainingArguments) and reuses this group."""
    if world() == 1:
        return
    if shards_weights() and recipe["load_in_4bit"]:
        # sharding 4-bit weights needs bitsandbytes' quant_storage set to match, which this kit does not do
        raise UserError(f"{strategy()}{' ZeRO-3' if zero_stage() == 3 else ''} shards the weights and cannot "
                        "shard 4-bit ones here: add --set load_in_4bit=false, or train QLoRA with "
                        "configs/ddp.yaml (the trained adapter is small; DDP is the faster fit for it)")
    import torch
    from accelerate import PartialState

    if not torch.cuda.is_available():
        # accelerate names the device "cpu:0" on the CPU, and torch.load(map_location="cpu:0"), which the
        # Trainer uses to read optimizer.pt when resuming with several processes, fails on it
        os.environ.setdefault("ACCELERATE_TORCH_DEVICE", "cpu")
    # cpu=True on a machine without CUDA: accelerate only picks gloo (MULTI_CPU) when told it is on the CPU
    PartialState(cpu=not torch.cuda.is_available(), timeout=TIMEOUT)


def barrier():
    import torch.distributed as dist

    if world() > 1 and dist.is_available() and dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def main_first():
    """Rank 0 runs the block first (it fills the caches: synthetic charts, the tiny model, datasets), then the
    first rank of every other node (its cache may be a local disk), then all the others, who read what was
    written. A cache written by two processes at once would be a race."""
    first, node_first = is_main(), local_rank() == 0 and not is_main()
    if not first:
        barrier()
    if not (first or node_first):
        barrier()
    try:
        yield
    finally:
        if first:
            barrier()
        if first or node_first:
            barrier()


def any_rank(flag: bool) -> bool:
    """True on every rank when it is true on any rank (a stop request that reached one process)."""
    if world() == 1:
        return flag
    import torch
    import torch.distributed as dist

    value = torch.tensor([1.0 if flag else 0.0], device=_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def total(value: float) -> float:
    """The sum over ranks (tokens seen by all processes)."""
    if world() == 1:
        return value
    import torch
    import torch.distributed as dist

    tensor = torch.tensor([float(value)], dtype=torch.float64, device=_device())
    dist.all_reduce(tensor)
    return tensor.item()


def _device():
    import torch.distributed as dist

    # nccl only moves CUDA tensors; gloo only CPU ones
    return f"cuda:{local_rank()}" if dist.get_backend() == "nccl" else "cpu"


def zero_stage() -> int:
    """The DeepSpeed ZeRO stage of this launch (0 when not DeepSpeed), from accelerate's config or its JSON."""
    if strategy() != "deepspeed":
        return 0
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "")
    if path and path.lower() != "none":
        import json

        try:
            return int(json.loads(open(path).read()).get("zero_optimization", {}).get("stage", 0))
        except (OSError, ValueError) as error:
            raise UserError(f"{path}: cannot read the DeepSpeed config ({error}); run from the repository root "
                            "or give its full path in the accelerate config") from None
    return int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "0"))


def shards_weights() -> bool:
    """FSDP and ZeRO-3 split the weights themselves; the others keep a whole copy on every GPU."""
    return strategy() == "fsdp" or zero_stage() == 3


def device_map():
    """Where a rank loads the model: its own GPU; the CPU under FSDP/ZeRO-3, which then move their shards
    to the GPU (loading the whole model on every GPU first would defeat them)."""
    return None if shards_weights() else {"": local_rank()}


def save_model(trainer, folder):
    """The final weights into `folder`. With several ranks every rank takes part (FSDP and ZeRO-3 gather
    their shards first) and the main rank writes."""
    if world() == 1:
        trainer.model.save_pretrained(folder)
        return
    barrier()
    trainer.save_model(str(folder))
    if is_main():
        (folder / "training_args.bin").unlink(missing_ok=True)  # the run folder holds run_config.json instead
    barrier()


@contextlib.contextmanager
def errors_from_every_rank():
    """Inside this block (training), an error may happen on one rank only (its shard of the data), so every
    rank reports its own; outside it every rank meets the same errors and only rank 0 reports them."""
    global _every_rank_reports
    _every_rank_reports = True
    try:
        yield
    finally:
        _every_rank_reports = False


_every_rank_reports = False


def report_error(line: str):
    """Rank 0 says it. Another rank first gives rank 0 time to: it meets the same bad input, and the launcher
    stops every rank as soon as one exits. Still alive after that, the error was this rank's alone: say it."""
    if not (is_main() or _every_rank_reports):
        import signal
        import time

        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the launcher's stop ends this rank, silently
        time.sleep(10)
    import click

    click.echo(line, err=True)


def describe_line(recipe: dict) -> str:
    """The line train.py prints under a launcher: processes and the global batch they make."""
    launch = describe(recipe)
    return (f"data parallel: {launch['world_size']} processes ({launch['launcher']}, {launch['strategy']}); "
            f"global batch {recipe['per_device_train_batch_size']} per device x "
            f"{recipe['gradient_accumulation_steps']} accumulation x {launch['world_size']} = {launch['global_batch']}")
