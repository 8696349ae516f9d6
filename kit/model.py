"""Models: the base (hub id, local folder, `tiny[:FAMILY]`, `random:SHAPE`), LoRA on top, and reloading runs.

`tiny:FAMILY` and `random:SHAPE` are built here without any download by the model's family (kit/families/): a
real model of that architecture with a locally trained byte-level BPE tokenizer, the family's chat template and
its real image processor. They are saved into a cache folder once and then loaded through the ordinary
`from_pretrained` path, so every later step (LoRA, merge, GGUF) sees an ordinary model folder.
"""

import re
from pathlib import Path

import torch

from kit import families, run_checks
from kit.errors import UserError
from kit.paths import build_dir, cache_dir


class UnknownModel(UserError):
    """A model_name_or_path that is no folder, no name the kit builds and no hub id."""


def tiny_model_dir(family: str = families.DEFAULT_TINY) -> Path:
    """The family's tiny real-architecture model, built once into the cache."""
    chosen = families.by_name(family)
    target = cache_dir() / f"tiny-{chosen.name}-{chosen.tiny_version}"
    if (target / "config.json").exists():
        return target
    return build_dir(target, chosen.build_tiny)


def random_model_dir(shape: str, weights: bool = True) -> Path:
    """Random weights of a true shape (`random:qwen2-vl-7b`), saved in bf16. With weights=False only config and
    processor, enough to plan a run without building gigabytes."""
    found = families.of_name(f"random:{shape}")
    family = found[0]
    target = cache_dir() / (f"random-{shape}" if weights else f"random-{shape}-config")
    if (target / "config.json").exists():
        return target
    return build_dir(target, lambda folder: family.build_random(shape, folder, weights))


def resolve(model_name_or_path: str, weights: bool = True) -> str:
    """A folder as given; `tiny[:FAMILY]` and `random:SHAPE` are built (once) and become cache folders; a hub id
    is checked to be reachable (or cached). Anything else is one line naming the choices."""
    name = model_name_or_path
    if Path(name).exists():
        return name
    built = families.of_name(name)
    if built:
        family, shape = built
        return str(random_model_dir(shape, weights) if shape else tiny_model_dir(family.name))
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) or name.startswith((".", "-")) or ".." in name:
        raise UnknownModel(f"model_name_or_path={name}: not a folder, not a model the kit builds "
                           f"({', '.join(families.built_names())}), and not a hub id (OWNER/NAME, e.g. "
                           "Qwen/Qwen2.5-VL-7B-Instruct)")
    check_hub_model(name)
    return name


def check_hub_model(name: str):
    """A hub id with no network and no cached copy is one line now, not minutes of retries and a traceback."""
    from data.hub import HubUnavailable, host, reachable

    if Path(name).exists() or reachable():
        return
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return  # cached: offline mode loads it from there
    raise HubUnavailable(f"model {name}: {host()} cannot be reached and there is no cached copy; download it "
                         f"where there is network (hf download {name}) and copy ~/.cache/huggingface here, or set "
                         "model_name_or_path to a local folder (--set model_name_or_path=PATH)")


def lora_target_regex(family: families.Family, vision: bool, language: bool, attention: bool, mlp: bool) -> str:
    """The Linear layers that get adapters, as peft's target_modules regex (Unsloth's finetune_* switches), by the
    family's module names (Qwen2-VL's vision MLP is fc1/fc2, Qwen2.5-VL's gate/up/down_proj)."""
    return family.lora.regex(vision, language, attention, mlp)


def load_base(path: str, backend: str, load_in_4bit: bool, dtype, gradient_checkpointing: bool = True,
              full_finetuning: bool = False, dynamic_4bit: bool = False):
    """(model, processor) for a model folder or hub id, through unsloth or plain transformers.

    Unsloth swaps a hub id for its own pre-quantized "dynamic 4-bit" repository unless told the exact name is
    meant; the kit loads the named base (what --plan measured and the hf backend loads) unless the recipe sets
    unsloth_dynamic_4bit, and says which checkpoint it got."""
    if Path(path).is_dir():  # a local folder whose weights are gone or cut is one line, not a library traceback
        run_checks.check(Path(path), None, "copy the model's weights back into the folder, or make it again")
    if backend == "unsloth":
        import click
        from unsloth import FastVisionModel

        model, processor = FastVisionModel.from_pretrained(
            path, load_in_4bit=load_in_4bit, dtype=dtype, full_finetuning=full_finetuning,
            use_gradient_checkpointing="unsloth" if gradient_checkpointing else False,
            use_exact_model_name=not dynamic_4bit)
        loaded = getattr(model.config, "_name_or_path", "") or path
        click.echo(f"unsloth: loaded {loaded}" + (f" (asked for {path})" if loaded != path else ""))
        return model, processor
    from transformers import AutoModelForImageTextToText, AutoProcessor, BitsAndBytesConfig

    kwargs = {"dtype": dtype}
    if load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            llm_int8_skip_modules=modules_kept_16bit(path))
    if torch.cuda.is_available():
        from kit.train.distributed import device_map

        kwargs["device_map"] = device_map()  # this rank's own GPU (GPU 0 for one process)
    model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
    processor = AutoProcessor.from_pretrained(path)
    return model, processor


def modules_kept_16bit(path: str) -> list[str] | None:
    """BitsAndBytesConfig's llm_int8_skip_modules for the family of the model at `path`: None (transformers'
    default, the output head) when the family quantizes every other Linear. A list replaces that default rather
    than adding to it (transformers 5.17's bnb quantizer), so the head is named again."""
    kept = families.of_model(path).keep_16bit
    return ["lm_head", *kept] if kept else None


def add_lora(model, recipe: dict, backend: str):
    family = families.of_model_type(model.config.model_type)
    wanted = recipe.get("finetune_experts", False)  # absent from recipes of runs from before the key
    experts = family.lora.experts if wanted and recipe["finetune_language_layers"] else ()
    if wanted and not family.lora.experts:
        raise UserError(f"finetune_experts=true: {family.name} has no routed experts (a dense model); drop it")
    if backend == "unsloth" and experts:
        raise UserError("finetune_experts=true adapts the routed experts through peft's target_parameters, which "
                        "the unsloth backend does not take: --set backend=hf, or leave the experts frozen")
    if backend == "unsloth":
        from unsloth import FastVisionModel

        return FastVisionModel.get_peft_model(
            model, finetune_vision_layers=recipe["finetune_vision_layers"],
            finetune_language_layers=recipe["finetune_language_layers"],
            finetune_attention_modules=recipe["finetune_attention_modules"],
            finetune_mlp_modules=recipe["finetune_mlp_modules"], r=recipe["lora_r"],
            lora_alpha=recipe["lora_alpha"], lora_dropout=recipe["lora_dropout"], bias="none",
            random_state=recipe["seed"],
            # get_peft_model switches checkpointing on by itself ("unsloth") unless told otherwise
            use_gradient_checkpointing="unsloth" if recipe["gradient_checkpointing"] else False)
    from peft import LoraConfig, get_peft_model
    from transformers import set_seed

    # peft draws lora_A from torch's global generator: seeded, two runs of a recipe start from the same adapter
    # (what Unsloth's random_state does), so a resumed run can match an uninterrupted one bit for bit
    set_seed(recipe["seed"])
    if recipe["load_in_4bit"]:
        prepare_4bit_for_training(model, recipe["gradient_checkpointing"])
    config = LoraConfig(r=recipe["lora_r"], lora_alpha=recipe["lora_alpha"], lora_dropout=recipe["lora_dropout"],
                        bias="none", task_type="CAUSAL_LM",
                        target_modules=lora_target_regex(family, recipe["finetune_vision_layers"],
                                                         recipe["finetune_language_layers"],
                                                         recipe["finetune_attention_modules"],
                                                         recipe["finetune_mlp_modules"]),
                        target_parameters=list(experts) or None)
    return get_peft_model(model, config)


def prepare_4bit_for_training(model, gradient_checkpointing: bool):
    """What peft's prepare_model_for_kbit_training does to a 4-bit base before LoRA (freeze it, norms and biases in
    fp32, inputs that carry gradients through checkpointed layers), except that the embedding tables and an
    unquantized output head stay in the dtype they were loaded in. peft casts them to fp32 too: for a frozen lookup
    table that only doubles its bytes (bench.py --memory: 0.87 of a 4-bit 2B's 1.89 GB; a 7B's untied head and
    embeddings would take 4.4 GB in fp32), and its bf16 values widen to fp32 exactly, so nothing is gained."""
    head = model.get_output_embeddings()
    tables = {id(param) for layer in (model.get_input_embeddings(), head) if layer is not None
              for param in layer.parameters()}
    for param in model.parameters():
        param.requires_grad = False
        if id(param) in tables:
            if param.device.type == "cpu":
                # as loaded, a table is a view of the memory-mapped checkpoint, which keeps every page of the file
                # that quantizing read resident (a 2B: 4.2 GB, not its 0.43 GB table); a copy lets the file go
                param.data = param.data.clone()
        elif param.dtype in (torch.float16, torch.bfloat16) and param.__class__.__name__ != "Params4bit":
            param.data = param.data.to(torch.float32)
    if head is not None and head.weight.dtype != torch.float32:
        # the fp32 norm before it hands the head fp32 hidden states; the logits come out 16-bit, as they do on a
        # 16-bit base (the loss widens them to fp32)
        head.register_forward_pre_hook(hidden_states_in_head_dtype)
    if gradient_checkpointing:
        model.enable_input_require_grads()  # the checkpointed layers' inputs need grads for the adapter's to flow
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def hidden_states_in_head_dtype(head, args):
    return (args[0].to(head.weight.dtype), *args[1:])


def adapter_in_fp32(model):
    """A LoRA adapter's weights in fp32, as peft makes them. TRL's trainers cast a 4-bit base's adapter to bf16 when
    they are built (after the QLoRA paper), but resuming from a checkpoint loads it through peft's load_adapter in
    fp32 again, so a resumed run went on with other numbers than an uninterrupted one (the first resumed step's
    loss moved in the fifth digit). fp32 in both keeps a resumed run bit-identical, and the optimizer's updates
    are not rounded to bf16's 8 bits of mantissa; the plan already priced the adapter so. Costs up to 8 bytes more
    per adapter weight (weight, gradient and AdamW's two moments in fp32): a 7B's r=16 adapter on every language
    Linear has 40M, so at most 0.32 GB."""
    if not hasattr(model, "peft_config"):  # a full fine-tune trains its weights in the dtype it loaded
        return
    for param in model.parameters():
        if param.requires_grad and param.dtype in (torch.float16, torch.bfloat16):
            param.data = param.data.to(torch.float32)


def load_for_training(path: str, recipe: dict, backend: str, dtype):
    """(model ready to train, processor): the base as the recipe loads it, LoRA attached for finetune=lora."""
    model, processor = load_base(path, backend, recipe["load_in_4bit"], dtype, recipe["gradient_checkpointing"],
                                 full_finetuning=recipe["finetune"] == "full",
                                 dynamic_4bit=recipe["unsloth_dynamic_4bit"])
    if recipe["finetune"] == "lora":
        model = add_lora(model, recipe, backend)
    if backend == "unsloth":
        from unsloth import FastVisionModel

        FastVisionModel.for_training(model)
    return model, processor


def load_run(run_dir: Path, backend: str, dtype, load_in_4bit: bool | None = None, weights_dir: Path | None = None):
    """(model, processor, run_config) of a finished run: base + adapter, or the fully fine-tuned model.
    `weights_dir`: one of the run's checkpoints instead of its final weights."""
    config = run_checks.read_run_config(run_dir)
    fix = (f"give another checkpoint, or the run folder {run_dir}" if weights_dir
           else run_checks.run_fix(run_dir))
    run_checks.check(Path(weights_dir or run_dir), config, fix)
    run_dir = Path(weights_dir or run_dir)
    recipe = config["recipe"]
    four_bit = recipe["load_in_4bit"] if load_in_4bit is None else load_in_4bit
    if (run_dir / "adapter_config.json").exists():
        model, _ = load_base(resolve(recipe["model_name_or_path"]), backend, four_bit, dtype,
                             dynamic_4bit=recipe.get("unsloth_dynamic_4bit", False))
        if backend == "unsloth":
            model.load_adapter(str(run_dir))
        else:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(run_dir))
    else:
        model, _ = load_base(str(run_dir), backend, False, dtype)
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(run_dir)
    return model, processor, config
