"""Models: the base (hub id, local folder, `tiny`, `random:qwen2-vl-2b|7b`), LoRA on top, and reloading runs.

`tiny` and `random:*` are built here without any download: a real Qwen2VLForConditionalGeneration with a
locally trained byte-level BPE tokenizer (Qwen2's pre-tokenizer regex and special tokens), Qwen2-VL's chat
template and the real image processor. They are saved into a cache folder once and then loaded through the
ordinary `from_pretrained` path, so every later step (LoRA, merge, GGUF) sees an ordinary model folder.
"""

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

QWEN2_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Same order as Qwen2-VL's added tokens, so the ids keep their relative layout.
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
# Qwen2-VL-Instruct's chat template (the one its processor ships), reproduced so the tiny model formats
# conversations exactly as the real one does.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# The true Qwen2-VL shapes (config.json of the Instruct checkpoints), for speed and memory work on a GPU.
REAL_SHAPES = {
    "qwen2-vl-2b": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                        intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True),
    "qwen2-vl-7b": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                        intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False),
}
REAL_VISION = dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4, patch_size=14, spatial_merge_size=2,
                   temporal_patch_size=2, hidden_act="quick_gelu", in_channels=3)
TINY_VERSION = "v1"  # bump when the tiny model's recipe changes, so caches are rebuilt


def cache_dir() -> Path:
    root = os.environ.get("QWEN2VL_KIT_CACHE") or Path.home() / ".cache" / "qwen2vl-kit"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _tokenizer_corpus():
    # Enough varied text that the BPE merges cover chart questions, labels, numbers and chat words.
    from data.synthetic import LABELS, QUESTION_TEMPLATES

    words = ("the a of in and to is what which how many value highest lowest largest smallest bar line "
             "chart year percent total average difference between sum number answer question image picture "
             "shows label axis title red blue green orange purple you are helpful assistant system user "
             "latex formula equation write read this reply with word only").split()
    for label in LABELS:
        yield label
    for template in QUESTION_TEMPLATES.values():
        yield template.format(label=LABELS[0], mark="bar")
    for i in range(400):
        yield " ".join(words[(i * 7 + j * 3) % len(words)] for j in range(12))
        yield f"{i} {i * 3 % 101}.{i % 10} {i * 17 % 1000}% {1990 + i % 35}"


def build_tokenizer():
    from tokenizers import Tokenizer, Regex, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=640, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(_tokenizer_corpus(), trainer)
    state = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=state["vocab"], merges=merges, errors="replace",
                               unk_token=None, bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.model_max_length = 32768
    return tokenizer


def build_processor(tokenizer, min_pixels=56 * 56, max_pixels=28 * 28 * 1280):
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    image_processor = Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels)
    return Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                            video_processor=Qwen2VLVideoProcessor(), chat_template=CHAT_TEMPLATE)


def qwen2vl_config(tokenizer, text: dict, vision: dict, **extra):
    from transformers import Qwen2VLConfig

    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in [
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")]}
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    # mrope splits each head's rotary half into (temporal, height, width) sections; Qwen2-VL uses 16/24/24 of 64.
    sections = {16: [2, 3, 3], 128: [16, 24, 24]}.get(head_dim)
    if sections is None:
        raise ValueError(f"no mrope section known for head dim {head_dim}")
    text_config = dict(text, rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": sections},
                       bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
                       eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                       pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
                       max_position_embeddings=32768, rms_norm_eps=1e-6)
    vision_config = dict(vision, hidden_size=text["hidden_size"])
    return Qwen2VLConfig(text_config=text_config, vision_config=vision_config,
                         tie_word_embeddings=text.get("tie_word_embeddings", False), **ids, **extra)


def _save_atomically(build, target: Path):
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        build(tmp)
        if target.exists():  # another process won the race; keep theirs
            shutil.rmtree(tmp)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def tiny_model_dir() -> Path:
    """The tiny real-architecture Qwen2-VL (0.3M parameters), built once into the cache."""
    target = cache_dir() / f"tiny-qwen2-vl-{TINY_VERSION}"
    if (target / "config.json").exists():
        return target

    def build(path):
        from transformers import Qwen2VLForConditionalGeneration

        tokenizer = build_tokenizer()
        text = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=128, vocab_size=len(tokenizer), tie_word_embeddings=False)
        # Vision depth >= 3: llama.cpp's mmproj converter expects at least that many blocks.
        vision = dict(REAL_VISION, depth=3, embed_dim=32, num_heads=2)
        # A wider init than 0.02 lets a 0.3M-parameter model leave the "answer without looking" plateau sooner.
        config = qwen2vl_config(tokenizer, text, vision, initializer_range=0.05)
        config.text_config.initializer_range = config.vision_config.initializer_range = 0.05
        torch.manual_seed(0)
        model = Qwen2VLForConditionalGeneration(config).to(torch.float32)
        model.generation_config.eos_token_id = config.text_config.eos_token_id
        model.generation_config.pad_token_id = config.text_config.pad_token_id
        model.save_pretrained(path)
        build_processor(tokenizer).save_pretrained(path)

    return _save_atomically(build, target)


def random_model_dir(shape: str, weights: bool = True) -> Path:
    """Random weights of a true Qwen2-VL shape, saved in bf16 (2B: ~4.4 GB, 7B: ~16 GB of disk).
    With weights=False only config and processor, enough to plan a run without building gigabytes."""
    if shape not in REAL_SHAPES:
        raise ValueError(f"unknown shape random:{shape}; choose one of: "
                         + ", ".join(f"random:{s}" for s in REAL_SHAPES))
    target = cache_dir() / (f"random-{shape}" if weights else f"random-{shape}-config")
    if (target / "config.json").exists():
        return target

    def build(path):
        from transformers import Qwen2VLForConditionalGeneration

        tokenizer = build_tokenizer()
        config = qwen2vl_config(tokenizer, REAL_SHAPES[shape], REAL_VISION)
        if not weights:
            config.save_pretrained(path)
            build_processor(tokenizer).save_pretrained(path)
            return
        torch.manual_seed(0)
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = Qwen2VLForConditionalGeneration(config).to(torch.bfloat16)
        model.save_pretrained(path)
        build_processor(tokenizer).save_pretrained(path)

    return _save_atomically(build, target)


def resolve(model_name_or_path: str, weights: bool = True) -> str:
    """Hub id or folder as given; `tiny` and `random:*` are built (once) and become cache folders."""
    if model_name_or_path == "tiny":
        return str(tiny_model_dir())
    if model_name_or_path.startswith("random:"):
        return str(random_model_dir(model_name_or_path.split(":", 1)[1], weights))
    check_hub_model(model_name_or_path)
    return model_name_or_path


def check_hub_model(name: str):
    """A hub id with no network and no cached copy is one line now, not minutes of retries and a traceback."""
    import re

    from data.hub import HubUnavailable, host, reachable

    if Path(name).exists() or not re.fullmatch(r"[\w.-]+/[\w.-]+", name) or reachable():
        return
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return  # cached: offline mode loads it from there
    raise HubUnavailable(f"model {name}: {host()} cannot be reached and there is no cached copy; download it "
                         f"where there is network (hf download {name}) and copy ~/.cache/huggingface here, or set "
                         "model_name_or_path to a local folder (--set model_name_or_path=PATH)")


def lora_target_regex(vision: bool, language: bool, attention: bool, mlp: bool) -> str:
    """The Linear layers that get adapters, as peft's target_modules regex (Unsloth's finetune_* switches)."""
    parts = []
    if language:
        names = (["q_proj", "k_proj", "v_proj", "o_proj"] if attention else []) + \
                (["gate_proj", "up_proj", "down_proj"] if mlp else [])
        if names:
            parts.append(rf"model\.language_model\.layers\.\d+\.(self_attn|mlp)\.({'|'.join(names)})")
    if vision:
        names = (["qkv", "proj"] if attention else []) + (["fc1", "fc2"] if mlp else [])
        if names:
            parts.append(rf"model\.visual\.blocks\.\d+\.(attn|mlp)\.({'|'.join(names)})")
    if not parts:
        raise ValueError("no layers selected for LoRA: enable finetune_language_layers or finetune_vision_layers, "
                         "and finetune_attention_modules or finetune_mlp_modules")
    return rf".*({'|'.join(parts)})$"


def load_base(path: str, backend: str, load_in_4bit: bool, dtype, gradient_checkpointing: bool = True,
              full_finetuning: bool = False, dynamic_4bit: bool = False):
    """(model, processor) for a model folder or hub id, through unsloth or plain transformers.

    Unsloth swaps a hub id for its own pre-quantized "dynamic 4-bit" repository unless told the exact name is
    meant; the kit loads the named base (what --plan measured and the hf backend loads) unless the recipe sets
    unsloth_dynamic_4bit, and says which checkpoint it got."""
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
            bnb_4bit_compute_dtype=dtype if dtype != torch.float32 else torch.float32)
    if torch.cuda.is_available():
        from kit.distributed import device_map

        kwargs["device_map"] = device_map()  # this rank's own GPU (GPU 0 for one process)
    model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
    processor = AutoProcessor.from_pretrained(path)
    return model, processor


def add_lora(model, recipe: dict, backend: str):
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
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if recipe["load_in_4bit"]:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=recipe["gradient_checkpointing"])
    config = LoraConfig(r=recipe["lora_r"], lora_alpha=recipe["lora_alpha"], lora_dropout=recipe["lora_dropout"],
                        bias="none", task_type="CAUSAL_LM",
                        target_modules=lora_target_regex(recipe["finetune_vision_layers"],
                                                         recipe["finetune_language_layers"],
                                                         recipe["finetune_attention_modules"],
                                                         recipe["finetune_mlp_modules"]))
    return get_peft_model(model, config)


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
    config = json.loads((Path(run_dir) / "run_config.json").read_text())
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
