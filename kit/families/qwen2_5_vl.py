"""Qwen2.5-VL (model_type qwen2_5_vl): Qwen2-VL's text model, chat markup and processor rules, with a new vision
tower: RMSNorm blocks, a SwiGLU MLP (`gate_proj`/`up_proj`/`down_proj`, not fc1/fc2), window attention in every
block but those of `fullatt_block_indexes`, a vision width of its own (`hidden_size`, not `embed_dim`) and a
merger into `out_hidden_size`. llama.cpp: text arch qwen2vl, projector qwen2.5vl_merger.
"""

from dataclasses import replace
from functools import partial

from kit.families import Linear, LlamaNames, LoraNames, Shape, _tiny, qwen2_vl

# The true Qwen2.5-VL shapes (config.json of Qwen/Qwen2.5-VL-3B-Instruct and -7B-Instruct).
TEXT_SHAPES = {
    "qwen2.5-vl-3b": dict(hidden_size=2048, num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
                          intermediate_size=11008, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-vl-7b": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                          intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False),
}
# Both checkpoints share one vision tower; only the merger's output (out_hidden_size = text width) differs.
VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14, spatial_merge_size=2,
              temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu",
              in_channels=3, tokens_per_second=2)
# Three blocks (llama.cpp's mmproj converter wants at least that many), window attention in the first two and full
# attention in the last: llama.cpp's converter accepts only evenly spaced full-attention blocks (its n_wa_pattern,
# the first index + 1). A 112-pixel window is 4x4 merged tokens, so a 140-pixel chart (5x5) spans four windows.
TINY_VISION = dict(VISION, depth=3, hidden_size=64, intermediate_size=128, num_heads=2, fullatt_block_indexes=[2])


def shape(config) -> Shape:
    vision = config.vision_config
    ve, depth, mlp = vision.hidden_size, vision.depth, vision.intermediate_size
    return qwen2_vl.vision_shape(config, ve, (Linear("vision", "mlp", "gate_proj", depth, ve, mlp),
                                              Linear("vision", "mlp", "up_proj", depth, ve, mlp),
                                              Linear("vision", "mlp", "down_proj", depth, mlp, ve)),
                                 vision.out_hidden_size)


def config(tokenizer, text: dict, vision: dict, **extra):
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(text_config=qwen2_vl.text_config(tokenizer, text),
                            vision_config=dict(vision, out_hidden_size=text["hidden_size"]),
                            tie_word_embeddings=text.get("tie_word_embeddings", False),
                            **_tiny.vision_token_ids(tokenizer, qwen2_vl.MARKUP), **extra)


# tiny: Qwen2-VL's tiny text model and init with the 2.5 tower in small; random: 3B ~7.5 GB, 7B ~16.6 GB of disk
build_processor = partial(qwen2_vl.build_processor, processor_class="Qwen2_5_VLProcessor")
build_tiny, build_random = qwen2_vl.builders("Qwen2_5_VLForConditionalGeneration", config, build_processor,
                                             TEXT_SHAPES, VISION, TINY_VISION)


FAMILY = replace(
    qwen2_vl.FAMILY,
    name="qwen2.5-vl",
    model_types=("qwen2_5_vl",),
    processor_classes=("Qwen2_5_VLProcessor",),
    lora=LoraNames(vision_mlp=("gate_proj", "up_proj", "down_proj")),
    shape=shape,
    build_tiny=build_tiny,
    tiny_version="v2",
    random_shapes=TEXT_SHAPES,
    build_random=build_random,
    llama=LlamaNames(text_arch="qwen2vl", projector="qwen2.5vl_merger"),
)
