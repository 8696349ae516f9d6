"""Host (CPU) memory of this process, as Linux counts it: resident set now, its peak since a reset, and a way to
hand freed heap back first, so a reading is what the process holds rather than what malloc keeps cached.

bench.py --memory reads these around the phases of a few LoRA steps (model loaded, optimizer step, peak) to set
the plan's parts beside measured ones on a machine without a GPU.
"""

import contextlib
import ctypes
import gc
from pathlib import Path

GIB = 1024**3
STATUS = Path("/proc/self/status")


def available() -> bool:
    """Whether this system reports the figures (Linux /proc); elsewhere bench.py --memory says it cannot run."""
    return STATUS.exists() and Path("/proc/self/clear_refs").exists()


def _status_bytes(field: str) -> int:
    for line in STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # the kernel writes kB
    raise RuntimeError(f"{field} missing from {STATUS}")


def settle():
    """Collect garbage and give free heap pages back to the system (glibc keeps them otherwise), so the resident
    set reflects live objects."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: readings include malloc's cache
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def resident() -> int:
    """Bytes resident now (VmRSS), after settle()."""
    settle()
    return _status_bytes("VmRSS")


def peak() -> int:
    """The largest resident set since the last reset_peak() (VmHWM)."""
    return _status_bytes("VmHWM")


def reset_peak():
    """Start a new peak from the resident set now (writing 5 to clear_refs resets VmHWM)."""
    settle()
    Path("/proc/self/clear_refs").write_text("5")


def touch(model):
    """Read one element of every page of the model's weights. transformers maps a safetensors file whose dtype is
    the one asked for and reads its pages only on first use, so right after loading a 16-bit base is not yet
    resident; a GPU copies it whole."""
    import torch

    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.device.type == "cpu" and tensor.numel():
                tensor.detach().reshape(-1)[::512].float().sum()  # 512 elements: at most 2 KB apart
