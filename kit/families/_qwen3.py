"""What Qwen3-VL and Qwen3.5 share (not a family: the leading "_"): the Qwen3 tokens and chat markup, the vision
tower (16-pixel patches merged 2x2, so one token covers 32 x 32 pixels; MLP `linear_fc1`/`linear_fc2`; a merger
`linear_fc1`/`linear_fc2`, plus Qwen3-VL's DeepStack mergers), the processor classes, the tiny tokenizer and the
llama.cpp handler. The chat templates are the real ones, kept as files in templates/: Qwen3-VL-Instruct's (no
thinking; the template a Qwen3-VL GGUF carries) and Qwen3.5's (thinking on unless `enable_thinking=False`, in
llama.cpp's models/templates/Qwen3.5-4B.jinja).
"""

import json
import math
from pathlib import Path

from kit.families import Linear, Markup, _tiny

TEMPLATES = Path(__file__).parent / "templates"
# Qwen3.5's tokenizer.json adds combining marks (\p{M}) to letters; llama.cpp's pre-tokenizer "qwen35" is this
# regex (llama-vocab.cpp), Qwen3-VL keeps Qwen2's ("qwen2").
QWEN35_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen3's added tokens after Qwen2-VL's 14 special ones, in the real order. They are not special tokens in the real
# tokenizers (decode(skip_special_tokens=True) keeps them), so a <think> block a model writes stays visible to
# eval.py, which strips and counts it.
PLAIN_TOKENS = ("<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
                "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>")
MARKUP = Markup(think=("<think>", "</think>"))
# Short ChartQA answers train and are scored with thinking off: Qwen3.5's template then writes an empty block
# "<think>\n\n</think>\n\n" after the assistant header (the collator keeps it out of the loss); Qwen3-VL-Instruct's
# template has no thinking and no flag for it.
THINKING_OFF = {"enable_thinking": False}
PROCESSOR_CLASSES = ("Qwen3VLProcessor",)
# preprocessor_config.json of Qwen3-VL and Qwen3.5: patch 16, merge 2, temporal 2, mean = std = 0.5; its pixel
# bounds (shortest_edge 65536, longest_edge 16777216) are the recipe's min/max_pixels here.
PIXELS = dict(patch_size=16, merge_size=2, temporal_patch_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3)
TINY_MIN_PIXELS, TINY_MAX_PIXELS = 32 * 32 * 4, 32 * 32 * 1280


def video_size(frames: int, width: int, height: int, processor) -> tuple[int, int]:
    """A video frame's (width, height) after Qwen3-VL's video resize: sides rounded to the grid, and the pixels of
    all frames (rounded to whole frame groups) within the video processor's [shortest_edge, longest_edge]."""
    vp = processor.video_processor
    grid, temporal = vp.patch_size * vp.merge_size, vp.temporal_patch_size
    low, high = vp.size["shortest_edge"], vp.size["longest_edge"]
    if height < grid or width < grid:
        scale = max(grid / height, grid / width)
        height, width = int(height * scale), int(width * scale)
    h, w = round(height / grid) * grid, round(width / grid) * grid
    t = round(frames / temporal) * temporal
    if t * h * w > high:
        beta = math.sqrt(frames * height * width / high)
        h, w = max(grid, math.floor(height / beta / grid) * grid), max(grid, math.floor(width / beta / grid) * grid)
    elif t * h * w < low:
        beta = math.sqrt(low / (frames * height * width))
        h, w = math.ceil(height * beta / grid) * grid, math.ceil(width * beta / grid) * grid
    return w, h


def chat_template(name: str) -> str:
    return (TEMPLATES / f"{name}.jinja").read_text()


def build_tokenizer(template: str, regex: str = _tiny.QWEN2_PRETOKENIZE_REGEX, qwen3_5: bool = False):
    """A byte-level BPE trained on the kit's corpus with the family's split regex, Qwen2-VL's special tokens, the
    Qwen3 plain added tokens (<think>, </think>, ...) and the family's chat template; Qwen3.5 uses its own
    tokenizer class (Qwen3_5Tokenizer), as its checkpoints do."""
    from tokenizers import AddedToken

    vocab, merges = _tiny.train_bpe(regex)
    if qwen3_5:
        from transformers import Qwen3_5Tokenizer as tokenizer_class
    else:
        from transformers import Qwen2Tokenizer as tokenizer_class
    tokenizer = tokenizer_class(vocab=vocab, merges=merges, unk_token=None, bos_token=None,
                                eos_token=MARKUP.im_end, pad_token=MARKUP.end_of_text)
    tokenizer.add_special_tokens({"additional_special_tokens": list(_tiny.QWEN2_VL_SPECIAL_TOKENS)})
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in PLAIN_TOKENS])
    tokenizer.chat_template = template
    tokenizer.model_max_length = 32768
    return tokenizer


def build_processor(tokenizer, min_pixels: int = TINY_MIN_PIXELS, max_pixels: int = TINY_MAX_PIXELS):
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

    return Qwen3VLProcessor(image_processor=Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels,
                                                                  **PIXELS),
                            tokenizer=tokenizer, video_processor=Qwen3VLVideoProcessor(**PIXELS),
                            chat_template=tokenizer.chat_template)


def uses_qwen3_5_tokenizer(processor) -> bool:
    """Qwen3-VL and Qwen3.5 share Qwen3VLProcessor; the tokenizer tells them apart (Qwen3.5 has its own class and a
    248k vocabulary whose image pad is id 248056)."""
    tokenizer = processor.tokenizer
    return type(tokenizer).__name__.startswith("Qwen3_5") or \
        tokenizer.convert_tokens_to_ids(MARKUP.image_pad) >= 200_000


def vision_linears(vision, deepstack: int = 0) -> tuple[Linear, ...]:
    """The vision tower's Linear layers: blocks (qkv, proj, linear_fc1, linear_fc2), the merger and `deepstack`
    DeepStack mergers (each as wide as the merger: 2x2 patches in, one text-width token out)."""
    vh, depth, inter = vision.hidden_size, vision.depth, vision.intermediate_size
    wide = vh * vision.spatial_merge_size ** 2
    mergers = [("merger.linear_fc1", 1, wide, wide), ("merger.linear_fc2", 1, wide, vision.out_hidden_size)]
    if deepstack:
        mergers += [("deepstack_merger_list.linear_fc1", deepstack, wide, wide),
                    ("deepstack_merger_list.linear_fc2", deepstack, wide, vision.out_hidden_size)]
    return (Linear("vision", "attention", "qkv", depth, vh, 3 * vh),
            Linear("vision", "attention", "proj", depth, vh, vh),
            Linear("vision", "mlp", "linear_fc1", depth, vh, inter),
            Linear("vision", "mlp", "linear_fc2", depth, inter, vh),
            *(Linear("merger", "merger", name, count, d_in, d_out) for name, count, d_in, d_out in mergers))


def embed_parameters(config) -> int:
    text = config.text_config
    tied = getattr(config, "tie_word_embeddings", False) or getattr(text, "tie_word_embeddings", False)
    return text.vocab_size * text.hidden_size * (1 if tied else 2)


# the routed experts' parameters as peft's target_parameters names them (suffixes of the full parameter names)
EXPERT_PARAMETERS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


def expert_linears(text, layers: int) -> tuple[Linear, ...]:
    """Routed experts (3-D parameters, not Linear modules: LoRA reaches them only through peft's target_parameters,
    which the recipe key finetune_experts turns on) and the router, for the memory plan."""
    h, e, inter = text.hidden_size, text.num_experts, text.moe_intermediate_size
    return (Linear("language", "experts", "experts.gate_up_proj", layers * e, h, 2 * inter),
            Linear("language", "experts", "experts.down_proj", layers * e, inter, h),
            Linear("language", "router", "gate", layers, h, e))


def save_model(cls, config, folder, processor, weights: bool = True, bf16: bool = False):
    """_tiny.save_random_model, with both of Qwen3's end ids (<|im_end|>, <|endoftext|>) in generation_config, as
    the checkpoints' generation_config.json has them."""
    _tiny.save_random_model(cls, config, folder, processor, weights, bf16)
    path = folder / "generation_config.json"
    if path.exists():
        generation = json.loads(path.read_text())
        generation["eos_token_id"] = [config.text_config.eos_token_id, config.text_config.pad_token_id]
        path.write_text(json.dumps(generation, indent=2) + "\n")


def builders(tokenizer, config, model_class, moe: bool, tiny: dict, text_shapes: dict, vision_shapes: dict,
             rope: dict):
    """(build_tiny, build_random) of a Qwen3 family file's dense or MoE variant: `tokenizer()`, `config(...)` and
    `model_class(moe)` are the file's own; `tiny` holds its tiny model's text, experts, vision, rope and init."""
    def build_tiny(folder):
        chosen = tokenizer()
        text = dict(tiny["text"], vocab_size=len(chosen), **(tiny["experts"] if moe else {}))
        made = config(chosen, text, tiny["vision"], tiny["rope"], moe, initializer_range=tiny["init"])
        save_model(model_class(moe), made, folder, build_processor(chosen))

    def build_random(name: str, folder, weights: bool):
        chosen = tokenizer()
        full = config(chosen, text_shapes[name], vision_shapes[name], rope, moe)
        # the checkpoints' pixel bounds (preprocessor_config.json: shortest_edge 65536, longest_edge 16777216)
        processor = build_processor(chosen, min_pixels=256 * 256, max_pixels=16777216)
        save_model(model_class(moe), full, folder, processor, weights, bf16=True)

    return build_tiny, build_random
