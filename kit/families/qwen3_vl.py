"""Qwen3-VL (model_type qwen3_vl) and Qwen3-VL-MoE (qwen3_vl_moe): two families, one file (FAMILIES).

Vision: a ViT of `depth` blocks, `hidden_size` wide (attention `qkv`/`proj`, MLP `linear_fc1`/`linear_fc2`,
gelu-tanh), 16-pixel patches merged 2x2 (one token per 32 x 32 pixels) by the merger `linear_fc1`/`linear_fc2`,
and DeepStack: the features of the blocks in `deepstack_visual_indexes` go through their own mergers
(`deepstack_merger_list.N`) and are added to the hidden states of the first LLM layers at the image positions.
Text: Qwen3 (q/k norms, explicit head_dim) with interleaved 3-D mrope; the MoE variant replaces every MLP by routed
experts (fused 3-D parameters `mlp.experts.gate_up_proj` / `down_proj`, not Linear modules) and a router.
llama.cpp: text arch qwen3vl / qwen3vlmoe (with n_deepstack_layers), projector qwen3vl_merger (its
is_deepstack_layers flags mark the DeepStack blocks).
"""

from dataclasses import replace

from kit.families import Family, Linear, LlamaNames, LoraNames, Shape, _qwen3, _tiny

# True shapes, from the checkpoints' config.json (see docs/qwen3.md for where each number was read).
TEXT_SHAPES = {
    "qwen3-vl-2b": dict(hidden_size=2048, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                        head_dim=128, intermediate_size=6144, vocab_size=151936, tie_word_embeddings=True),
    "qwen3-vl-4b": dict(hidden_size=2560, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                        head_dim=128, intermediate_size=9728, vocab_size=151936, tie_word_embeddings=True),
    "qwen3-vl-8b": dict(hidden_size=4096, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                        head_dim=128, intermediate_size=12288, vocab_size=151936, tie_word_embeddings=False),
}
SMALL_VISION = dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16,
                    deepstack_visual_indexes=[5, 11, 17])  # 2B and 4B
LARGE_VISION = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16,
                    deepstack_visual_indexes=[8, 16, 24])  # 8B (and the 30B-A3B MoE)
VISION_SHAPES = {"qwen3-vl-2b": SMALL_VISION, "qwen3-vl-4b": SMALL_VISION, "qwen3-vl-8b": LARGE_VISION}
VISION_COMMON = dict(hidden_act="gelu_pytorch_tanh", patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                     in_channels=3, num_position_embeddings=2304)
# rope theta 5e6; each head's rotary half (64 of 128) interleaved as 24 temporal / 20 height / 20 width
ROPE = {"rope_type": "default", "rope_theta": 5e6, "mrope_section": [24, 20, 20], "mrope_interleaved": True}

# Tiny: text 64 wide, 3 layers, head 16 (rotary half 8 as 4/2/2, temporal largest as in 24/20/20); vision 64 wide,
# depth 3 (llama.cpp's mmproj converter wants at least that), DeepStack from blocks 0 and 1 into LLM layers 0 and 1.
TINY_TEXT = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 intermediate_size=128, tie_word_embeddings=False)
TINY_VISION = dict(depth=3, hidden_size=64, intermediate_size=128, num_heads=2, deepstack_visual_indexes=[0, 1])
TINY_ROPE = dict(ROPE, mrope_section=[4, 2, 2])
# Expert widths of 64, not less: a narrower down_proj cannot be packed into NF4 blocks of 64 (QLoRA's base).
TINY_EXPERTS = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, decoder_sparse_step=1)
# A wider init than 0.02 lets a 0.4M-parameter model leave the "answer without looking" plateau sooner.
TINY_INIT = 0.05

LORA = LoraNames(vision_mlp=("linear_fc1", "linear_fc2"),
                 merger=(r"model\.visual\.merger\.linear_fc\d",
                         r"model\.visual\.deepstack_merger_list\.\d+\.linear_fc\d"))


def shape(config) -> Shape:
    text, vision = config.text_config, config.vision_config
    h, layers, hd = text.hidden_size, text.num_hidden_layers, text.head_dim
    q, kv = text.num_attention_heads * hd, text.num_key_value_heads * hd
    linears = [Linear("language", "attention", "q_proj", layers, h, q),
               Linear("language", "attention", "k_proj", layers, h, kv),
               Linear("language", "attention", "v_proj", layers, h, kv),
               Linear("language", "attention", "o_proj", layers, q, h)]
    if getattr(text, "num_experts", 0):
        linears += _qwen3.expert_linears(text, layers)
        inter = text.num_experts_per_tok * text.moe_intermediate_size  # what one token runs through
    else:
        inter = text.intermediate_size
        linears += [Linear("language", "mlp", "gate_proj", layers, h, inter),
                    Linear("language", "mlp", "up_proj", layers, h, inter),
                    Linear("language", "mlp", "down_proj", layers, inter, h)]
    linears += _qwen3.vision_linears(vision, deepstack=len(vision.deepstack_visual_indexes))
    return Shape(hidden=h, layers=layers, inter=inter, kv=kv, vocab=text.vocab_size,
                 embed=_qwen3.embed_parameters(config), vision_hidden=vision.hidden_size, vision_depth=vision.depth,
                 linears=tuple(linears))


def config(tokenizer, text: dict, vision: dict, rope: dict, moe: bool, initializer_range: float = 0.02):
    from transformers import Qwen3VLConfig, Qwen3VLMoeConfig

    markup = _qwen3.MARKUP
    text = dict(text, rope_parameters=rope, max_position_embeddings=262144, rms_norm_eps=1e-6, hidden_act="silu",
                initializer_range=initializer_range, **_tiny.text_token_ids(tokenizer, markup))
    vision = dict(VISION_COMMON, **vision, out_hidden_size=text["hidden_size"], initializer_range=initializer_range)
    return (Qwen3VLMoeConfig if moe else Qwen3VLConfig)(
        text_config=text, vision_config=vision, tie_word_embeddings=text["tie_word_embeddings"],
        **_tiny.vision_token_ids(tokenizer, markup))


def model_class(moe: bool):
    from transformers import Qwen3VLForConditionalGeneration, Qwen3VLMoeForConditionalGeneration

    return Qwen3VLMoeForConditionalGeneration if moe else Qwen3VLForConditionalGeneration


def tokenizer():
    return _qwen3.build_tokenizer(_qwen3.chat_template("qwen3_vl"))


def builders(moe: bool):
    """(build_tiny, build_random) for the dense or the MoE variant."""
    tiny = dict(text=TINY_TEXT, experts=TINY_EXPERTS, vision=TINY_VISION, rope=TINY_ROPE, init=TINY_INIT)
    return _qwen3.builders(tokenizer, config, model_class, moe, tiny, TEXT_SHAPES, VISION_SHAPES, ROPE)


def claims(processor) -> bool:
    return not _qwen3.uses_qwen3_5_tokenizer(processor)


MOE_LORA = replace(LORA, experts=_qwen3.EXPERT_PARAMETERS)
DENSE_TINY, DENSE_RANDOM = builders(moe=False)
MOE_TINY, MOE_RANDOM = builders(moe=True)
COMMON = dict(processor_classes=_qwen3.PROCESSOR_CLASSES, markup=_qwen3.MARKUP, shape=shape,
              # Qwen3-VL-Instruct's template has no thinking and reads no flag for it (a flag it does not read,
              # transformers takes for a processor argument and warns about at every call)
              claims_processor=claims, tiny_version="v2", video_timestamps=True, video_size=_qwen3.video_size)
FAMILIES = (
    Family(name="qwen3-vl", model_types=("qwen3_vl",), lora=LORA, build_tiny=DENSE_TINY, random_shapes=TEXT_SHAPES,
           build_random=DENSE_RANDOM, llama=LlamaNames(text_arch="qwen3vl", projector="qwen3vl_merger"), **COMMON),
    # No random: shapes for the MoE (its smallest checkpoint, 30B-A3B, is no single-24GB-GPU model).
    Family(name="qwen3-vl-moe", model_types=("qwen3_vl_moe",), lora=MOE_LORA, build_tiny=MOE_TINY, random_shapes={},
           build_random=MOE_RANDOM, llama=LlamaNames(text_arch="qwen3vlmoe", projector="qwen3vl_merger",
                                                 transposed_experts=_qwen3.EXPERT_PARAMETERS), **COMMON),
)
