"""Which training/inference stack to use, decided before transformers is imported.

unsloth must be imported before transformers, trl and peft to patch them; importing it on a machine without
CUDA patches trl for the whole process and its vision path then refuses the CPU, so the CPU never imports it.
"""

import importlib.util
import os
import sys

from kit.errors import UserError

# Tests only (make test-unsloth): lets the unsloth backend be chosen without a GPU, in Unsloth's own CPU mode
# (UNSLOTH_ALLOW_CPU=1), where the tests stand in for the CUDA-only FastVisionModel.from_pretrained.
TEST_UNSLOTH_ON_CPU = "QWEN2VL_KIT_TEST_UNSLOTH_ON_CPU"


class BackendError(UserError, RuntimeError):
    """The requested backend cannot run here; the message says what to do."""


def select(requested: str = "auto") -> tuple[str, str]:
    """Returns (backend, reason) and, for unsloth, imports it first thing."""
    import torch

    cuda = torch.cuda.is_available()
    has_unsloth = importlib.util.find_spec("unsloth") is not None
    if requested == "unsloth":
        if not cuda and os.environ.get(TEST_UNSLOTH_ON_CPU) != "1":
            raise BackendError("backend unsloth needs a CUDA GPU and none is visible; use --backend hf "
                               "(or --set backend=hf) to run on this machine")
        if not has_unsloth:
            raise BackendError("backend unsloth: the unsloth package is not installed; "
                               "pip install -r requirements.txt, or use --backend hf")
        backend, reason = "unsloth", "asked for"
    elif requested == "hf":
        backend, reason = "hf", "asked for"
    elif requested == "auto":
        if cuda and has_unsloth:
            backend, reason = "unsloth", f"CUDA GPU ({torch.cuda.get_device_name(0)}) and unsloth installed"
        elif cuda:
            backend, reason = "hf", "unsloth is not installed (pip install -r requirements.txt)"
        else:
            backend, reason = "hf", "no CUDA GPU: transformers + peft on the CPU"
    else:
        raise BackendError(f"unknown backend {requested!r}; choose auto, unsloth or hf")
    if backend == "unsloth" and "unsloth" not in sys.modules:
        if any(name in sys.modules for name in ("transformers", "trl", "peft")):
            raise BackendError("internal: unsloth must be imported before transformers, trl and peft")
        os.environ.setdefault("UNSLOTH_COMPILE_LOCATION", str(unsloth_compile_dir()))
        import unsloth  # noqa: F401  (patches transformers/trl/peft on import)
    return backend, reason


def unsloth_compile_dir():
    """Where Unsloth writes the trainer and model code it generates (UNSLOTH_COMPILE_LOCATION, read by unsloth_zoo
    when it is imported): the kit's cache, one folder per unsloth version, instead of ./unsloth_compiled_cache
    in whatever folder the user runs from."""
    from importlib.metadata import PackageNotFoundError, version

    from kit.paths import cache_dir

    try:
        unsloth_version = version("unsloth")
    except PackageNotFoundError:
        unsloth_version = "unknown"
    return cache_dir() / "unsloth_compiled_cache" / unsloth_version


def precision(requested: str = "auto", backend: str = "hf") -> str:
    """auto: bf16 where the GPU has it, fp16 on older GPUs (T4, V100), fp32 on the CPU. A precision the
    machine cannot run is replaced by the one it can, and the replacement is said."""
    import click
    import torch

    if requested == "fp32" and backend == "unsloth":
        # UnslothSFTTrainer.__init__ (generated from unsloth/models/rl.py) turns bf16/fp16 autocast on whenever
        # both are off, so an fp32 run would silently train in mixed precision.
        raise BackendError("precision=fp32 is not available on the unsloth backend (Unsloth's trainer turns "
                           "bf16/fp16 autocast on when both are off); use --backend hf for fp32, or --set "
                           "precision=auto")

    if not torch.cuda.is_available():
        if requested in ("bf16", "fp16"):
            click.echo(f"note: precision {requested} asked for, but there is no GPU: using fp32")
        return "fp32"
    supported = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if requested == "bf16" and supported != "bf16":
        click.echo(f"note: {torch.cuda.get_device_name(0)} has no bf16: using fp16 instead")
        return "fp16"
    return supported if requested == "auto" else requested


def torch_dtype(name: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def check_cpu_4bit():
    """4-bit on the CPU needs bitsandbytes with CPU kernels (0.45+); older builds crash deep inside."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = version("bitsandbytes")
    except PackageNotFoundError:
        raise BackendError("load_in_4bit needs bitsandbytes (pip install bitsandbytes), or set load_in_4bit=false"
                           ) from None
    major, minor = (int(part) for part in found.split(".")[:2])
    if (major, minor) < (0, 45):
        raise BackendError(f"load_in_4bit on the CPU needs bitsandbytes >= 0.45 (found {found}); upgrade it, "
                           "or set load_in_4bit=false")
