"""What a run will cost, computed before it starts: token counts per sample (exactly what the collator
will produce), a max_pixels that keeps long images under a budget, and an estimate of peak GPU memory.

The memory estimate is a sum of named parts so a user can see what to change; BENCHMARKS.md records how
far it was from measured peaks.
"""

import math

import click

from kit import families
from kit.errors import UserError
from kit.inputs.chat import with_system
from kit.inputs.video import video_tokens

GIB = 1024**3
CUDA_OVERHEAD = 0.8 * GIB  # CUDA context + cuBLAS workspaces, measured ~0.6-0.9 GB on recent drivers


def image_tokens(image, processor) -> int:
    """Merged vision tokens of one image after Qwen's resize (sides to multiples of the grid, area in bounds)."""
    from kit.inputs.chat import image_size

    return size_tokens(*image_size(image), processor)  # reads the header only


def size_tokens(width: int, height: int, processor) -> int:
    """Merged vision tokens of a width x height image after Qwen's resize."""
    from kit.inputs.images import target_size

    grid = families.of_processor(processor).grid(processor)
    width, height = target_size(width, height, processor)
    return (height // grid) * (width // grid)


def timed_video_text_tokens(sample: dict, processor, system_prompt: str, recipe: dict | None = None) -> int:
    """Text tokens of a video row for a family whose processor writes each frame group's time before it: the
    chat text with every video pad replaced as the processor replaces it, tokenized whole (so the count is the
    tokenizer's, boundaries included), less the pads that stand for vision tokens."""
    from kit.inputs.video import seconds

    family = families.of_processor(processor)
    pad = family.markup.video_pad
    text = family.chat_text(processor, with_system(sample["messages"], system_prompt))
    pieces = text.split(pad)
    placeholders = [family.video_placeholder(seconds(video, processor, recipe)) for video in sample["videos"]]
    if len(pieces) != len(placeholders) + 1:  # lint finds such a row; counted as the template wrote it
        return len(processor.tokenizer(text)["input_ids"]) - len(sample["images"]) - len(sample["videos"])
    expanded = pieces[0] + "".join(p + rest for p, rest in zip(placeholders, pieces[1:]))
    pads = sum(p.count(pad) for p in placeholders)
    return len(processor.tokenizer(expanded)["input_ids"]) - len(sample["images"]) - pads


def suggest_max_pixels(samples, processor, budget: int, quantile: float = 0.95) -> int:
    """The largest max_pixels (a multiple of one token's grid x grid pixels) whose p95 image tokens stay within
    `budget`."""
    from kit.plan import scan

    grid = families.of_processor(processor).grid(processor)
    # the sizes preflight read from the image headers (cached), not a second pass over the images
    sizes = [size for row in scan.check_rows(samples, progress=False) for size in row[2] if size]
    if not sizes:
        return processor.image_processor.size["longest_edge"]
    areas = sorted(w * h for w, h in sizes)
    p95_area = areas[min(len(areas) - 1, int(quantile * len(areas)))]
    # image tokens ~ area / grid^2; cap the area so that the p95 image lands at the budget, in whole tokens
    token_area = grid * grid
    return max(token_area * 4, min(p95_area, budget * token_area) // token_area * token_area)


def videos_tokens(samples, index: int, processor, recipe: dict) -> int:
    """Vision tokens of a row's videos at the recipe's fps / max_frames (a list of rows only: the lazy Hugging
    Face sources hold no videos)."""
    if not isinstance(samples, list) or not samples[index].get("videos"):
        return 0
    return sum(video_tokens(video, processor, recipe) for video in samples[index]["videos"])


def stats(values: list[int]) -> dict:
    ordered = sorted(values)
    if not ordered:
        return {"min": 0, "median": 0, "p95": 0, "max": 0}
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"min": ordered[0], "median": pick(0.5), "p95": pick(0.95), "max": ordered[-1]}


def with_model_grid(recipe: dict, family, processor) -> dict:
    """The recipe with synthetic_grid (0: the model's own) set to the model's pixels per vision token, so aligned
    synthetic charts line up with this model's token columns (saved in run_config.json for eval and merge)."""
    grid = family.grid(processor)
    if recipe.get("synthetic_grid"):
        if recipe["synthetic_grid"] != grid and recipe["dataset"] in ("synthetic", "synthetic_text"):
            click.echo(f"note: synthetic_grid={recipe['synthetic_grid']} while the model's vision tokens are {grid} "
                       "pixels a side: aligned charts will not line up with them")
        return recipe
    return {**recipe, "synthetic_grid": grid}


def model_shape(path: str) -> dict:
    """Parameter counts from config.json alone (no weights loaded), by the model's family."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    family = families.of_model_type(config.model_type, str(path))
    shape = family.shape(config)
    linears = shape.linears
    total = lambda part, kind=None: sum(x.parameters for x in linears  # noqa: E731
                                        if x.part == part and kind in (None, x.kind))
    return {"family": family.name, "hidden": shape.hidden, "layers": shape.layers, "inter": shape.inter,
            "kv": shape.kv, "vocab": shape.vocab, "attn_linear": total("language", "attention"),
            # MoE experts and routers are MLP weights too (not Linear modules: LoRA reaches experts only with
            # finetune_experts)
            "mlp_linear": total("language", "mlp") + total("language", "experts") + total("language", "router"),
            "embed": shape.embed,
            "vision_linear": total("vision") + total("merger"), "vision_embed": shape.vision_hidden,
            "vision_depth": shape.vision_depth, "linears": linears}


def lora_parameters(shape: dict, recipe: dict) -> int:
    """Adapter parameters: r x (d_in + d_out) for every Linear the recipe's finetune_* switches select."""
    kinds = {"attention"} if recipe["finetune_attention_modules"] else set()
    kinds |= {"mlp"} if recipe["finetune_mlp_modules"] else set()
    kinds |= {"experts"} if recipe.get("finetune_experts") else set()
    parts = {"language"} if recipe["finetune_language_layers"] else set()
    parts |= {"vision"} if recipe["finetune_vision_layers"] else set()
    return sum(x.count * recipe["lora_r"] * (x.d_in + x.d_out) for x in shape["linears"]
               if x.part in parts and x.kind in kinds)


# --- the memory model's arithmetic: every figure of estimate_memory and per_gpu_memory comes from here ----------
NF4_BYTES = 4.127 / 8  # NF4 codes (4 bits) + double-quantised absmax scales, per parameter
# fp32 tensors of tokens x vocab at the peak of the loss (activation_parts says which), by backend: measured on
# hf; Unsloth's loss works through the vocabulary in chunks (not measured here: logits and their gradient)
LOGIT_COPIES = {"hf": 6, "unsloth": 2}


def element_bytes(precision: str) -> int:
    """Bytes of one 16-bit or fp32 weight or activation in the run's precision."""
    return 2 if precision in ("bf16", "fp16") else 4


def dense_parameters(shape: dict) -> int:
    """Every weight the plan counts: the Linear layers (language, experts, vision tower, merger) and embeddings."""
    return shape["attn_linear"] + shape["mlp_linear"] + shape["vision_linear"] + shape["embed"]


def trainable_parameters(shape: dict, recipe: dict) -> int:
    """What the optimizer updates: the adapters for finetune=lora, else every weight."""
    return lora_parameters(shape, recipe) if recipe["finetune"] == "lora" else dense_parameters(shape)


def optimizer_bytes(recipe: dict) -> int:
    """Optimizer state per trained parameter: AdamW's two fp32 moments, or bitsandbytes' two 8-bit ones."""
    return 2 if "8bit" in recipe["optim"] else 8


def trained_state_bytes(shape: dict, recipe: dict) -> float:
    """The trained weights in fp32, their fp32 gradients and the optimizer states."""
    return trainable_parameters(shape, recipe) * (4 + 4 + optimizer_bytes(recipe))


def module_names(shape: dict, part: str) -> str:
    """The family's module names in one part ("language": "q_proj k_proj ..."), as the plan's parts show them."""
    return " ".join(dict.fromkeys(x.name for x in shape["linears"] if x.part == part))


def weight_parts(shape: dict, recipe: dict, precision: str) -> dict:
    """The base weights' bytes by part, each named by the family's modules in it (what "base weights" holds).

    Under load_in_4bit every Linear is NF4 and the embeddings are not quantized; they stay 16-bit on both backends
    (kit.model.prepare_4bit_for_training keeps them out of peft's fp32 cast, which bench.py --memory measured
    doubling them)."""
    half = element_bytes(precision)
    per_parameter = NF4_BYTES if recipe["load_in_4bit"] else half
    parts = {}
    for part in ("language", "vision", "merger"):
        count = sum(x.parameters for x in shape["linears"] if x.part == part)
        if count:
            parts[f"{part} ({module_names(shape, part)})"] = count * per_parameter
    parts["embeddings" + (" + output head" if shape["embed"] > shape["vocab"] * shape["hidden"] else "")] = \
        shape["embed"] * half
    return parts


def lora_targets(shape: dict, recipe: dict) -> str:
    """Which of the family's modules get adapters, by part: "language q_proj ...; vision qkv ..."."""
    kinds = {k for k, on in (("attention", recipe["finetune_attention_modules"]),
                             ("mlp", recipe["finetune_mlp_modules"]),
                             ("experts", recipe.get("finetune_experts"))) if on}
    found = []
    for part, on in (("language", recipe["finetune_language_layers"]), ("vision", recipe["finetune_vision_layers"])):
        names = dict.fromkeys(x.name for x in shape["linears"] if on and x.part == part and x.kind in kinds)
        if names:
            found.append(f"{part} {' '.join(names)}")
    return "; ".join(found) or "none"


def estimate_memory(shape: dict, recipe: dict, max_tokens: int, max_image_tokens: int, precision: str,
                    backend: str = "hf") -> dict:
    """Peak GPU bytes by part, for the largest sample in a batch of per_device_train_batch_size (with packing:
    that many samples as long as the largest, packed into rows of up to max_length)."""
    parts = {"base weights": sum(weight_parts(shape, recipe, precision).values()),
             "LoRA/trained weights + grads + optimizer": trained_state_bytes(shape, recipe),
             **activation_parts(shape, recipe, max_tokens, max_image_tokens, precision, backend),
             "CUDA overhead": CUDA_OVERHEAD}
    parts["total"] = sum(parts.values()) * 1.1  # allocator fragmentation, seen at 5-15 %
    return parts


def activation_parts(shape: dict, recipe: dict, max_tokens: int, max_image_tokens: int, precision: str,
                     backend: str = "hf") -> dict:
    """{"activations (largest sample)", "logits"}: bytes live at the peak of the backward pass."""
    from kit.inputs.packing import worst_rows

    half = element_bytes(precision)
    batch, h, tokens = recipe["per_device_train_batch_size"], shape["hidden"], max_tokens
    # the language model runs on rows: a batch of padded samples, or fewer, longer packed rows
    rows, tokens = worst_rows(batch, tokens, recipe["max_length"]) if recipe["packing"] else (batch, tokens)
    per_token_layer = h * half  # one checkpointed hidden state per layer
    recompute = tokens * (h * 8 + shape["inter"] * 3 + shape["kv"] * 2) * half  # one layer live again
    if recipe["gradient_checkpointing"]:
        activations = rows * (tokens * per_token_layer * shape["layers"] + recompute)
    else:
        activations = rows * shape["layers"] * (tokens * (h * 8 + shape["inter"] * 3) * half)
    # hf: fp32 tensors of tokens x vocab live at once: the logits, the loss's log-softmax, TRL's shifted copy for
    # its token accuracy, and in the backward pass the softmax and the gradients. bench.py --memory measured 5.7
    # to 7.3 on random:qwen2-vl-2b (371 tokens, two runs each of the 4-bit and the 16-bit base)
    logits = rows * tokens * shape["vocab"] * 4 * LOGIT_COPIES.get(backend, LOGIT_COPIES["hf"])
    patches = max_image_tokens * 4  # 2x2 patches merge into one token
    vision = batch * patches * shape["vision_embed"] * half * 12  # one block's forward, frozen tower
    return {"activations (largest sample)": activations + vision, "logits": logits}


def gpu_memory(named: str | None) -> tuple[str, int | None]:
    """(description, bytes) of the GPU to plan for: a named size, else the one present, else none."""
    import torch

    if named:
        return named, named_gpu(named)[0]
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return props.name, props.total_memory
    return "no GPU", None


# Cards by name: (memory, whether it has bf16). A size alone ("16GB") says nothing about bf16.
GPU_CARDS = {"T4": (16, False), "P100": (16, False), "V100": (16, False), "V100-32GB": (32, False),
             "L4": (24, True), "A10G": (24, True), "A10": (24, True), "RTX3090": (24, True), "RTX4090": (24, True),
             "A100": (80, True), "A100-40GB": (40, True), "L40S": (48, True), "A6000": (48, True),
             "H100": (80, True), "H200": (141, True)}


def named_gpu(named: str) -> tuple[int, bool | None]:
    """(bytes, has bf16 or None when unknown) for --gpu: a size (12GB, 12G, 11.5GB, 16gib) or a card (T4, A100)."""
    import re

    key = named.upper().replace(" ", "").replace("_", "-")
    if key in GPU_CARDS:
        size, bf16 = GPU_CARDS[key]
        return int(size * GIB), bf16
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(?:G|GB|GIB)?", key)
    if not match or not 1 <= float(match.group(1)) <= 1024:
        raise UserError(f"--gpu {named}: give the card's memory (e.g. 12GB, 16GB, 24GB, 11.5GB) or its name "
                        f"({', '.join(GPU_CARDS)})")
    return int(float(match.group(1)) * GIB), None


def planning_precision(actual: str, requested: str, named: str | None) -> str:
    """The precision to estimate memory in: that of the card planned for, not of this machine. bf16 and fp16
    take the same bytes, so for a card named only by size the recipe's choice (auto: bf16) is as good as any."""
    import torch

    if named:
        if requested in ("bf16", "fp16", "fp32"):
            return "fp16" if requested == "bf16" and named_gpu(named)[1] is False else requested
        return "fp16" if named_gpu(named)[1] is False else "bf16"
    return actual if torch.cuda.is_available() else "bf16"


def gb(value: float) -> str:
    return f"{value / GIB:.1f} GB"


def steps_per_epoch(rows: int, recipe: dict) -> int:
    return math.ceil(rows / (recipe["per_device_train_batch_size"] * recipe["gradient_accumulation_steps"]))


def preflight(samples, processor, recipe):
    """Lint findings (broken rows and rows over max_length) and each sample's (image, text) token counts."""
    from kit.plan import scan

    # lint's checks (every image fully decoded) and the header sizes: one pass over all cores, cached by the
    # data set's fingerprint; then text tokens (cached too). Image tokens follow from the sizes.
    rows = scan.check_rows(samples)
    findings = scan.findings(samples, rows)
    broken = {index for index, _, _ in findings}
    good = [i for i in range(len(samples)) if i not in broken]
    texts = scan.text_tokens(samples, good, processor, recipe["system_prompt"])
    if families.of_processor(processor).video_timestamps and isinstance(samples, list):
        texts = [timed_video_text_tokens(samples[i], processor, recipe["system_prompt"], recipe)
                 if samples[i].get("videos") else text for i, text in zip(good, texts)]
    counts = [(sum(size_tokens(w, h, processor) for w, h in rows[i][2]) + videos_tokens(samples, i, processor, recipe),
               text) for i, text in zip(good, texts)]
    for index, (image, text) in zip(good, counts):
        if image + text > recipe["max_length"]:
            findings.append((index, samples[index].get("source") or f"row {index} ({samples[index].get('id')})",
                             f"{image + text} tokens ({image} image + {text} text) > max_length "
                             f"{recipe['max_length']}; raise max_length or lower max_pixels"))
    return findings, counts


def print_plan(samples, counts, findings, memory, gpu_name, gpu_bytes, recipe, processor, shape=None,
               precision="bf16", backend="hf"):
    images, texts = [i for i, _ in counts], [t for _, t in counts]
    for name, values in (("image tokens", images), ("text tokens", texts), ("total tokens",
                                                                            [i + t for i, t in counts])):
        st = stats(values)
        click.echo(f"{name:>13}: min {st['min']} | median {st['median']} | p95 {st['p95']} | max {st['max']}")
    over = [f for f in findings if "max_length" in f[2]]
    click.echo(f"over max_length ({recipe['max_length']}): {len(over)} sample(s); other problems: "
               f"{len(findings) - len(over)}")
    for _, place, problem in findings[:10]:
        click.echo(f"  {place}: {problem}")
    budget = max(recipe["max_length"] - stats(texts)["p95"] - 16, 64)
    click.echo(f"suggested max_pixels for p95 under {budget} image tokens: "
               f"{suggest_max_pixels(samples, processor, budget)} (now {recipe['max_pixels']})")
    click.echo(f"steps per epoch: {steps_per_epoch(len(samples), recipe)}")
    print_padding(counts, recipe)
    click.echo(f"peak GPU memory estimate ({recipe['model_name_or_path']}, "
               f"{'4-bit' if recipe['load_in_4bit'] else '16-bit'}, batch {recipe['per_device_train_batch_size']}, "
               f"{backend} backend):")
    for part, value in memory.items():
        click.echo(f"  {part:<42} {gb(value)}")
        if shape and part == "base weights":  # what they are, in the family's module names
            for name, size in weight_parts(shape, recipe, precision).items():
                click.echo(f"    {name:<40} {gb(size)}")
        if shape and part.startswith("LoRA") and recipe["finetune"] == "lora":
            click.echo(f"    adapters on: {lora_targets(shape, recipe)}")
    if gpu_bytes is None:
        click.echo("no GPU here: name one with --gpu 24GB to check the fit")
    elif memory["total"] <= gpu_bytes:
        click.echo(f"fits: {gb(memory['total'])} of {gb(gpu_bytes)} on {gpu_name}")
    else:
        click.echo(f"does not fit: {gb(memory['total'])} > {gb(gpu_bytes)} on {gpu_name}; lower "
                   "per_device_train_batch_size (raise gradient_accumulation_steps to keep the batch), "
                   "max_pixels, or lora_r")


def print_padding(counts, recipe):
    """The share of computed positions that would be padding, padded and packed (same seeded batches)."""
    from kit.inputs.packing import padding_fraction, worst_rows

    lengths, batch = [i + t for i, t in counts], recipe["per_device_train_batch_size"]
    padded, packed = (padding_fraction(lengths, batch, recipe["max_length"], p, recipe["seed"]) for p in (False, True))
    rows, width = worst_rows(batch, max(lengths, default=0), recipe["max_length"])
    click.echo(f"expected padding: {100 * padded:.1f} % padded, {100 * packed:.1f} % packed (micro-batches of "
               f"{batch}, packed rows of up to {recipe['max_length']} tokens); packing={str(recipe['packing']).lower()}"
               + (f": memory below for the largest micro-batch packed, {rows} row(s) x {width} tokens"
                  if recipe["packing"] else ""))


def gpu_count(named: str | None) -> tuple[int, str | None]:
    """--gpu 4x24GB -> (4, "24GB"); 4x -> (4, None: the card present). Without a count: the launch's world
    size, so `torchrun --nproc_per_node 4 train.py --plan` plans for 4 as well."""
    import os

    count, _, size = (named or "").upper().replace(" ", "").rpartition("X")
    if count:
        if not count.isdigit() or int(count) < 1:
            raise UserError(f"--gpu {named}: write N x SIZE, e.g. 4x24GB (or 4x for 4 of the card present)")
        return int(count), size or None
    return int(os.environ.get("WORLD_SIZE", "1")), named


def per_gpu_memory(shape: dict, recipe: dict, memory: dict, gpus: int, precision: str) -> dict:
    """Peak bytes per GPU with `gpus` data-parallel processes, by strategy, from the one-GPU parts.

    Activations and logits stay per device (each GPU runs per_device_train_batch_size samples); what the
    strategies split is the model state. DDP keeps everything and adds its gradient buckets; ZeRO-2 splits
    gradients and optimizer states; ZeRO-3 and FSDP also split the weights and gather one layer at a time."""
    half = element_bytes(precision)
    trainable = trainable_parameters(shape, recipe)
    weights, state = memory["base weights"], memory["LoRA/trained weights + grads + optimizer"]
    rest = memory["activations (largest sample)"] + memory["logits"] + memory["CUDA overhead"]
    bucket = trainable * 4  # DDP's fp32 gradient buckets, a second copy of the gradients for all-reduce
    # ZeRO-3/FSDP gather one decoder layer's weights (two with prefetch) on top of their shard. They run with
    # a 16-bit base: train.py refuses to shard 4-bit weights.
    sharded = dense_parameters(shape) * half
    layer = 2 * (shape["attn_linear"] + shape["mlp_linear"]) / shape["layers"] * half
    totals = {
        "DDP": weights + state + bucket + rest,
        "ZeRO-2": weights + trainable * 4 + trainable * (4 + optimizer_bytes(recipe)) / gpus + rest,
        "ZeRO-3 / FSDP" + (" (load_in_4bit=false)" if recipe["load_in_4bit"] else ""):
            ((sharded if recipe["load_in_4bit"] else weights) + state) / gpus + layer + rest,
    }
    return {name: value * 1.1 for name, value in totals.items()}  # fragmentation, as estimate_memory


def print_multi_gpu(rows: int, recipe: dict, per_gpu: dict, gpus: int, gpu_name: str, gpu_bytes: int | None):
    per_step = recipe["per_device_train_batch_size"] * recipe["gradient_accumulation_steps"] * gpus
    click.echo(f"on {gpus} GPUs: global batch {recipe['per_device_train_batch_size']} per device x "
               f"{recipe['gradient_accumulation_steps']} accumulation x {gpus} = {per_step}; "
               f"steps per epoch: {math.ceil(rows / per_step)}")
    click.echo("peak memory per GPU by strategy (launch commands: README, 'Several GPUs'):")
    for name, value in per_gpu.items():
        verdict = "" if gpu_bytes is None else (" fits" if value <= gpu_bytes else " does not fit") + f" {gpu_name}"
        click.echo(f"  {name:<42} {gb(value)}{verdict}")
