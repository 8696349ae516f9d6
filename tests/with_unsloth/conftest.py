"""The Unsloth lane (make test-unsloth): the kit's code with Unsloth's patches in place, on the CPU.

It runs in its own venv holding the GPU install (install.py: requirements.txt on this machine's torch), with
UNSLOTH_ALLOW_CPU=1 and kit.backend's test switch. What is real and what stands in for what:

- unsloth is imported by kit.backend.select("unsloth"), the call train.py, eval.py and infer.py make, before
  transformers, trl and peft; its patches (image processor, tokenizers, Trainer, peft, generation) are Unsloth's own.
- On a GPU, `import unsloth` also rewrites TRL's trainers into generated classes (UnslothSFTTrainer, written to
  the compile cache). In CPU mode Unsloth skips that one step, so this file runs the same rewrite
  (unsloth.models.rl.PatchFastRL, what the GPU import calls) right after the import.
- FastVisionModel.from_pretrained needs CUDA, and FastVisionModel.get_peft_model only accepts a model that
  from_pretrained loaded (it checks for Unsloth's patched training loop). Both are replaced by stand-ins that
  first check that the kit's keywords bind to the installed signatures as named parameters (nothing lost in
  **kwargs), record them, then load the model / attach LoRA through transformers + peft (the hf backend's code).
  for_training and for_inference are Unsloth's own, as are the trainer and everything after the load.
- QLoRA (load_in_4bit=true) is therefore tested as far as CPU mode allows: the kit asks Unsloth's loader for a
  4-bit base, trains, evaluates and merges under Unsloth's patches, but the 4-bit base is bitsandbytes' NF4 loaded
  by transformers. Unsloth's own 4-bit loading, its pre-quantized dynamic-4bit checkpoints
  (unsloth_dynamic_4bit) and its QLoRA kernels need CUDA and are not run here.
"""

import inspect
import os
import sys
from pathlib import Path

import pytest

if os.environ.get("UNSLOTH_ALLOW_CPU") != "1" or os.environ.get("QWEN2VL_KIT_TEST_UNSLOTH_ON_CPU") != "1":
    pytest.exit("tests/with_unsloth runs in its own lane: make test-unsloth", returncode=2)

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from kit import backend  # noqa: E402  (imports only torch)

assert not any(name in sys.modules for name in ("transformers", "trl", "peft")), "unsloth must come first"
BACKEND, _ = backend.select("unsloth")  # imports unsloth exactly as the scripts do

from unsloth.models.rl import PatchFastRL  # noqa: E402

os.environ["UNSLOTH_ALLOW_CPU"] = "0"  # the GPU import's trainer rewrite, which CPU mode skips
try:
    PatchFastRL()
finally:
    os.environ["UNSLOTH_ALLOW_CPU"] = "1"

import torch  # noqa: E402
from unsloth import FastVisionModel  # noqa: E402
from unsloth.models.vision import FastBaseModel  # noqa: E402

# Where each kit call lands: FastModel.get_peft_model forwards (*args, **kwargs) to FastBaseModel's.
IMPLEMENTATIONS = {
    "from_pretrained": FastVisionModel.from_pretrained,
    "get_peft_model": FastBaseModel.get_peft_model,
    "for_training": FastVisionModel.for_training,
    "for_inference": FastVisionModel.for_inference,
}
CALLS: list[tuple[str, dict]] = []  # (name, keywords) of every call the kit made to FastVisionModel


def check_binds(name: str, args: tuple, kwargs: dict) -> inspect.BoundArguments:
    """Bind like Python would; a keyword that only a **kwargs catch-all takes is an error too (Unsloth would
    pass it on to transformers or drop it, never act on it)."""
    signature = inspect.signature(IMPLEMENTATIONS[name])
    bound = signature.bind(*args, **kwargs)
    catch_all = [p.name for p in signature.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD]
    swallowed = {key for name_ in catch_all for key in bound.arguments.get(name_, {})}
    if swallowed:
        raise TypeError(f"FastVisionModel.{name}: {sorted(swallowed)} are not parameters of the installed "
                        f"unsloth; they would fall into **{catch_all[0]}")
    CALLS.append((name, dict(kwargs)))
    bound.apply_defaults()  # what Unsloth would use for a keyword the kit leaves out
    return bound


def from_pretrained_standin(*args, **kwargs):
    """Stands in for FastVisionModel.from_pretrained (CUDA only): the same folder, loaded by transformers."""
    from kit.model import load_base

    bound = check_binds("from_pretrained", args, kwargs).arguments
    model, processor = load_base(bound["model_name"], "hf", bound["load_in_4bit"], bound["dtype"] or torch.float32)
    return model, processor


def get_peft_model_standin(model, *args, **kwargs):
    """Stands in for FastVisionModel.get_peft_model (needs a model Unsloth loaded): the same layers get LoRA
    through peft, with the kit's hf-backend code."""
    from kit.model import add_lora

    bound = check_binds("get_peft_model", (model, *args), kwargs).arguments
    recipe = {"finetune_vision_layers": bound["finetune_vision_layers"],
              "finetune_language_layers": bound["finetune_language_layers"],
              "finetune_attention_modules": bound["finetune_attention_modules"],
              "finetune_mlp_modules": bound["finetune_mlp_modules"], "lora_r": bound["r"],
              "lora_alpha": bound["lora_alpha"], "lora_dropout": bound["lora_dropout"], "load_in_4bit": False,
              "gradient_checkpointing": bound["use_gradient_checkpointing"] is not False,
              "seed": bound["random_state"]}  # add_lora seeds peft's initialisation with it, as Unsloth does
    return add_lora(model, recipe, "hf")


def spy(name: str):
    real = IMPLEMENTATIONS[name]

    def recorded(*args, **kwargs):
        check_binds(name, args, kwargs)
        return real(*args, **kwargs)

    return recorded


FastVisionModel.from_pretrained = staticmethod(from_pretrained_standin)
FastVisionModel.get_peft_model = staticmethod(get_peft_model_standin)
FastVisionModel.for_training = staticmethod(spy("for_training"))
FastVisionModel.for_inference = staticmethod(spy("for_inference"))


@pytest.fixture
def calls():
    """The FastVisionModel calls made during one test."""
    CALLS.clear()
    return CALLS


@pytest.fixture(scope="session", autouse=True)
def pip_dry_runs(request, tmp_path_factory):
    """The pip dry-runs test_pip_install.py reads, started before the first test: they wait minutes on the
    network (little CPU) while the training tests run. Left unread (-k elsewhere), they are stopped at the end."""
    from tests.with_unsloth import pip_check

    wanted = any("test_pip_install" in item.nodeid for item in request.session.items)
    started = pip_check.start_all(tmp_path_factory.mktemp("pip-dry-run")) if wanted else {}
    yield started
    for process, _ in started.values():
        if process.poll() is None:
            process.terminate()
            process.wait()
