"""Qwen2-VL (model_type qwen2_vl): the kit's first family and the demo's tiny model.

Vision: a ViT of `depth` blocks, `embed_dim` wide, attention `qkv`/`proj`, MLP `fc1`/`fc2` (quick_gelu,
`mlp_ratio` x wide), 14-pixel patches merged 2x2 by a 2-layer MLP merger into the text width. Text: Qwen2 with
3-D mrope. llama.cpp: text arch qwen2vl, projector qwen2vl_merger.
"""

from kit.families import Family, Linear, LlamaNames, Markup, Shape, _tiny

MARKUP = Markup()

# The true Qwen2-VL shapes (config.json of the Instruct checkpoints), for speed and memory work on a GPU.
TEXT_SHAPES = {
    "qwen2-vl-2b": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                        intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True),
    "qwen2-vl-7b": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                        intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False),
}
VISION = dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4, patch_size=14, spatial_merge_size=2,
              temporal_patch_size=2, hidden_act="quick_gelu", in_channels=3)
TINY_TEXT = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, tie_word_embeddings=False)
# Vision depth >= 3: llama.cpp's mmproj converter expects at least that many blocks. Every Linear is at least 64
# wide on its input, NF4's block: bitsandbytes' CPU inference cannot pack a narrower one, and QLoRA runs on these.
TINY_VISION = dict(VISION, depth=3, embed_dim=64, num_heads=2)
# mrope splits each head's rotary half into (temporal, height, width) sections; Qwen2-VL uses 16/24/24 of 64.
MROPE_SECTIONS = {16: [2, 3, 3], 128: [16, 24, 24]}


def text_shape(config) -> dict:
    """Shape fields and Linear layers of the Qwen2 text model, shared with Qwen2.5-VL (same decoder)."""
    text = config.text_config
    h, layers, inter = text.hidden_size, text.num_hidden_layers, text.intermediate_size
    kv = text.num_key_value_heads * (h // text.num_attention_heads)
    tied = getattr(config, "tie_word_embeddings", False) or getattr(text, "tie_word_embeddings", False)
    linears = (Linear("language", "attention", "q_proj", layers, h, h),
               Linear("language", "attention", "k_proj", layers, h, kv),
               Linear("language", "attention", "v_proj", layers, h, kv),
               Linear("language", "attention", "o_proj", layers, h, h),
               Linear("language", "mlp", "gate_proj", layers, h, inter),
               Linear("language", "mlp", "up_proj", layers, h, inter),
               Linear("language", "mlp", "down_proj", layers, inter, h))
    return dict(hidden=h, layers=layers, inter=inter, kv=kv, vocab=text.vocab_size,
                embed=text.vocab_size * h * (1 if tied else 2)), linears


def merger_linears(vision_width: int, merge: int, out: int) -> tuple[Linear, ...]:
    """The 2-layer MLP that maps merge x merge patches of the vision width to one token of the text width."""
    wide = vision_width * merge * merge
    return (Linear("merger", "merger", "mlp.0", 1, wide, wide), Linear("merger", "merger", "mlp.2", 1, wide, out))


def vision_shape(config, width: int, mlp: tuple, out: int) -> Shape:
    """Qwen2 text + a vision tower of `width` with qkv/proj attention, the `mlp` Linears and the merger into `out`."""
    fields, language = text_shape(config)
    depth, merge = config.vision_config.depth, config.vision_config.spatial_merge_size
    attention = (Linear("vision", "attention", "qkv", depth, width, 3 * width),
                 Linear("vision", "attention", "proj", depth, width, width))
    return Shape(**fields, vision_hidden=width, vision_depth=depth,
                 linears=language + attention + mlp + merger_linears(width, merge, out))


def shape(config) -> Shape:
    vision = config.vision_config
    ve, depth, mlp = vision.embed_dim, vision.depth, vision.embed_dim * vision.mlp_ratio
    return vision_shape(config, ve, (Linear("vision", "mlp", "fc1", depth, ve, mlp),
                                     Linear("vision", "mlp", "fc2", depth, mlp, ve)), vision.hidden_size)


def build_processor(tokenizer, processor_class: str = "Qwen2VLProcessor", min_pixels=56 * 56,
                    max_pixels=28 * 28 * 1280):
    """The family's processor around the real Qwen2-VL image and video processors (Qwen2.5-VL uses them too)."""
    import transformers

    image_processor = transformers.Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels)
    return getattr(transformers, processor_class)(image_processor=image_processor, tokenizer=tokenizer,
                                                  video_processor=transformers.Qwen2VLVideoProcessor(),
                                                  chat_template=_tiny.QWEN2_VL_CHAT_TEMPLATE)


def text_config(tokenizer, text: dict) -> dict:
    """A Qwen2(-VL) text config: mrope sections for the head size, Qwen's rope theta and token ids."""
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    sections = MROPE_SECTIONS.get(head_dim)
    if sections is None:
        raise ValueError(f"no mrope section known for head dim {head_dim}")
    return dict(text, rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": sections},
                max_position_embeddings=32768, rms_norm_eps=1e-6, **_tiny.text_token_ids(tokenizer, MARKUP))


def config(tokenizer, text: dict, vision: dict, **extra):
    from transformers import Qwen2VLConfig

    return Qwen2VLConfig(text_config=text_config(tokenizer, text),
                         vision_config=dict(vision, hidden_size=text["hidden_size"]),
                         tie_word_embeddings=text.get("tie_word_embeddings", False),
                         **_tiny.vision_token_ids(tokenizer, MARKUP), **extra)


def builders(model_class: str, make_config, make_processor, shapes: dict, vision: dict, tiny_vision: dict):
    """(build_tiny, build_random) for a family of Qwen2-VL's kind: the tiny model is Qwen2-VL's tiny text model
    with `tiny_vision`; `random:NAME` is `shapes[NAME]` with `vision`, in bf16."""

    def build_tiny(folder):
        import transformers

        tokenizer = _tiny.build_tokenizer()
        # A wider init than 0.02 lets a 0.3M-parameter model leave the "answer without looking" plateau sooner.
        tiny = make_config(tokenizer, dict(TINY_TEXT, vocab_size=len(tokenizer)), tiny_vision, initializer_range=0.05)
        tiny.text_config.initializer_range = tiny.vision_config.initializer_range = 0.05
        _tiny.save_random_model(getattr(transformers, model_class), tiny, folder, make_processor(tokenizer))

    def build_random(name: str, folder, weights: bool):
        import transformers

        tokenizer = _tiny.build_tokenizer()
        _tiny.save_random_model(getattr(transformers, model_class), make_config(tokenizer, shapes[name], vision),
                                folder, make_processor(tokenizer), weights, bf16=True)

    return build_tiny, build_random


# tiny: 0.3M parameters, what the demo trains; random: 2B ~4.4 GB, 7B ~16 GB of disk
build_tiny, build_random = builders("Qwen2VLForConditionalGeneration", config, build_processor, TEXT_SHAPES, VISION,
                                    TINY_VISION)


FAMILY = Family(
    name="qwen2-vl",
    model_types=("qwen2_vl",),
    processor_classes=("Qwen2VLProcessor",),
    markup=MARKUP,
    shape=shape,
    build_tiny=build_tiny,
    tiny_version="v2",
    random_shapes=TEXT_SHAPES,
    build_random=build_random,
    llama=LlamaNames(text_arch="qwen2vl", projector="qwen2vl_merger"),
)
