"""Qwen3.5 (model_type qwen3_5) and Qwen3.5-MoE (qwen3_5_moe): two families, one file (FAMILIES).

Text: hybrid layers, three Gated DeltaNet (linear attention) layers to one gated full-attention layer
(`layer_types`, full_attention_interval 4). Linear attention projects with `in_proj_qkv`, `in_proj_z` (the output
gate), `in_proj_b` / `in_proj_a` (per-head beta and decay, num_value_heads wide) and `out_proj`; on the CPU it
runs through transformers' torch fallback (no flash-linear-attention, no causal-conv1d). Full attention is gated
(q_proj writes query and gate: 2 x heads x head_dim), with a partial rotary (a quarter of head_dim) and interleaved
3-D mrope. Vision: Qwen3-VL's tower without DeepStack (16-pixel patches, merge 2: 32 x 32 pixels a token). The
MoE variant has routed experts (fused 3-D parameters), a router and a shared expert (Linear gate/up/down_proj).
llama.cpp: text arch qwen35 / qwen35moe, pre-tokenizer "qwen35", projector qwen3vl_merger. The checkpoints' config
names an MTP head (mtp_num_hidden_layers) that transformers neither loads nor saves: converting needs --no-mtp.
Unsloth advises 16-bit LoRA rather than QLoRA for Qwen3.5 (its quantization error is larger than usual).
"""

from dataclasses import replace

from kit.families import Family, Linear, LlamaNames, LoraNames, Shape, _qwen3, _tiny

# True shapes, from the checkpoints' config.json (see docs/qwen3.md for where each number was read).
LINEAR_ATTENTION = dict(linear_conv_kernel_dim=4, linear_key_head_dim=128, linear_value_head_dim=128,
                        linear_num_key_heads=16, linear_num_value_heads=32)
TEXT_SHAPES = {
    "qwen3.5-4b": dict(hidden_size=2560, num_hidden_layers=32, num_attention_heads=16, num_key_value_heads=4,
                       head_dim=256, intermediate_size=9216, vocab_size=248320, tie_word_embeddings=True,
                       **LINEAR_ATTENTION),
    "qwen3.5-9b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=16, num_key_value_heads=4,
                       head_dim=256, intermediate_size=12288, vocab_size=248320, tie_word_embeddings=False,
                       **LINEAR_ATTENTION),
}
VISION_SHAPES = {
    "qwen3.5-4b": dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16),
    "qwen3.5-9b": dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16),
}
VISION_COMMON = dict(hidden_act="gelu_pytorch_tanh", patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                     in_channels=3, num_position_embeddings=2304)
# rope theta 1e7 on a quarter of each head (64 of 256); the rotary half (32) interleaved 11 / 11 / 10
ROPE = {"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25, "mrope_section": [11, 11, 10],
        "mrope_interleaved": True}

# Tiny: text 64 wide, 3 DeltaNet layers + 1 full-attention layer, head 32 (rotary 8, half 4 as 2/1/1), 2 key and 4
# value heads of 16 in the DeltaNet layers (fewer key than value heads, as the real 16/32, so llama.cpp's V-head
# reordering is exercised); vision as Qwen3-VL's tiny without DeepStack.
TINY_TEXT = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                 intermediate_size=128, tie_word_embeddings=False, linear_conv_kernel_dim=4, linear_key_head_dim=16,
                 linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4)
TINY_VISION = dict(depth=3, hidden_size=64, intermediate_size=128, num_heads=2)
TINY_ROPE = dict(ROPE, mrope_section=[2, 1, 1])
TINY_EXPERTS = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, shared_expert_intermediate_size=64)
TINY_INIT = 0.05

# LoRA in the DeltaNet layers on every projection: in_proj_qkv and in_proj_z (the heads' content and output gate),
# in_proj_b / in_proj_a (per-head beta and decay: 32 wide, a few adapter parameters) and out_proj.
LORA = LoraNames(language_attention=("q_proj", "k_proj", "v_proj", "o_proj", "in_proj_qkv", "in_proj_z", "in_proj_b",
                                     "in_proj_a", "out_proj"),
                 vision_mlp=("linear_fc1", "linear_fc2"), merger=(r"model\.visual\.merger\.linear_fc\d",))


def layer_types(layers: int) -> list[str]:
    return ["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(layers)]


def shape(config) -> Shape:
    text, vision = config.text_config, config.vision_config
    h, hd = text.hidden_size, text.head_dim
    kinds = list(text.layer_types)
    full, linear = kinds.count("full_attention"), kinds.count("linear_attention")
    layers = len(kinds)
    q, kv = text.num_attention_heads * hd, text.num_key_value_heads * hd
    key, value = text.linear_num_key_heads * text.linear_key_head_dim, \
        text.linear_num_value_heads * text.linear_value_head_dim
    linears = [Linear("language", "attention", "q_proj", full, h, 2 * q),  # query and its output gate
               Linear("language", "attention", "k_proj", full, h, kv),
               Linear("language", "attention", "v_proj", full, h, kv),
               Linear("language", "attention", "o_proj", full, q, h),
               Linear("language", "attention", "in_proj_qkv", linear, h, 2 * key + value),
               Linear("language", "attention", "in_proj_z", linear, h, value),
               Linear("language", "attention", "in_proj_b", linear, h, text.linear_num_value_heads),
               Linear("language", "attention", "in_proj_a", linear, h, text.linear_num_value_heads),
               Linear("language", "attention", "out_proj", linear, value, h)]
    if getattr(text, "num_experts", 0):
        shared = text.shared_expert_intermediate_size
        linears += [*_qwen3.expert_linears(text, layers),
                    Linear("language", "mlp", "gate_proj", layers, h, shared),
                    Linear("language", "mlp", "up_proj", layers, h, shared),
                    Linear("language", "mlp", "down_proj", layers, shared, h),
                    Linear("language", "router", "shared_expert_gate", layers, h, 1)]
        inter = text.num_experts_per_tok * text.moe_intermediate_size + shared
    else:
        inter = text.intermediate_size
        linears += [Linear("language", "mlp", "gate_proj", layers, h, inter),
                    Linear("language", "mlp", "up_proj", layers, h, inter),
                    Linear("language", "mlp", "down_proj", layers, inter, h)]
    linears += _qwen3.vision_linears(vision)
    return Shape(hidden=h, layers=layers, inter=inter, kv=kv, vocab=text.vocab_size,
                 embed=_qwen3.embed_parameters(config), vision_hidden=vision.hidden_size, vision_depth=vision.depth,
                 linears=tuple(linears))


def config(tokenizer, text: dict, vision: dict, rope: dict, moe: bool, initializer_range: float = 0.02):
    from transformers import Qwen3_5Config, Qwen3_5MoeConfig

    markup = _qwen3.MARKUP
    text = dict(text, layer_types=layer_types(text["num_hidden_layers"]), rope_parameters=rope,
                max_position_embeddings=262144, rms_norm_eps=1e-6, hidden_act="silu",
                initializer_range=initializer_range, **_tiny.text_token_ids(tokenizer, markup))
    if moe:
        text.pop("intermediate_size", None)  # every layer is MoE: the dense width does not exist
    vision = dict(VISION_COMMON, **vision, out_hidden_size=text["hidden_size"], initializer_range=initializer_range)
    return (Qwen3_5MoeConfig if moe else Qwen3_5Config)(
        text_config=text, vision_config=vision, tie_word_embeddings=text["tie_word_embeddings"],
        **_tiny.vision_token_ids(tokenizer, markup))


def model_class(moe: bool):
    from transformers import Qwen3_5ForConditionalGeneration, Qwen3_5MoeForConditionalGeneration

    return Qwen3_5MoeForConditionalGeneration if moe else Qwen3_5ForConditionalGeneration


def tokenizer():
    return _qwen3.build_tokenizer(_qwen3.chat_template("qwen3_5"), regex=_qwen3.QWEN35_PRETOKENIZE_REGEX,
                                  qwen3_5=True)


def builders(moe: bool):
    """(build_tiny, build_random) for the dense or the MoE variant."""
    tiny = dict(text=TINY_TEXT, experts=TINY_EXPERTS, vision=TINY_VISION, rope=TINY_ROPE, init=TINY_INIT)
    return _qwen3.builders(tokenizer, config, model_class, moe, tiny, TEXT_SHAPES, VISION_SHAPES, ROPE)


# The converter counts an MTP block for mtp_num_hidden_layers and finds no tensors for it (transformers drops
# them): --no-mtp leaves it out. The tiny tokenizers split with Qwen3.5's regex, which llama.cpp calls "qwen35".
LLAMA = dict(projector="qwen3vl_merger", pre_tokenizer="qwen35", pre_tokenizer_regex=_qwen3.QWEN35_PRETOKENIZE_REGEX,
             converter_args=("--no-mtp",))
MOE_LORA = replace(LORA, experts=_qwen3.EXPERT_PARAMETERS)
DENSE_TINY, DENSE_RANDOM = builders(moe=False)
MOE_TINY, MOE_RANDOM = builders(moe=True)
COMMON = dict(processor_classes=_qwen3.PROCESSOR_CLASSES, markup=_qwen3.MARKUP, shape=shape,
              chat_template_kwargs=_qwen3.THINKING_OFF, claims_processor=_qwen3.uses_qwen3_5_tokenizer,
              tiny_version="v2", video_timestamps=True, video_size=_qwen3.video_size,  # its processor is Qwen3-VL's
              # transformers 5.17's Gated DeltaNet (torch path) runs its causal conv and recurrent state across a
              # packed row: packed loss 6.3795 against 6.3756 padded on the tiny model (tests/test_packing.py)
              packs=False)
# Under a 4-bit base, in_proj_b / in_proj_a (one beta and one decay per value head: 32 outputs in the real models,
# 4 in the tiny one) stay 16-bit: in the 9B they weigh 2 x 24 layers x 4096 x 32 x 2 bytes = 12.6 MB, so NF4 would
# save 9 MB of 5 GB, and their error would land in every step of every head's recurrence. The MoE's
# shared_expert_gate has ONE output (in the real 35B-A3B too): bitsandbytes' CPU kernels, which pack weights in
# blocks of 32 outputs, cannot run it at all, and a 1-wide Linear saves nothing in 4-bit anyway.
KEEP_16BIT = ("in_proj_b", "in_proj_a")
FAMILIES = (
    Family(name="qwen3.5", model_types=("qwen3_5",), lora=LORA, build_tiny=DENSE_TINY, random_shapes=TEXT_SHAPES,
           build_random=DENSE_RANDOM, llama=LlamaNames(text_arch="qwen35", **LLAMA), keep_16bit=KEEP_16BIT,
           **COMMON),
    # No random: shapes for the MoE (its smallest checkpoint, 35B-A3B, is no single-24GB-GPU model).
    Family(name="qwen3.5-moe", model_types=("qwen3_5_moe",), lora=MOE_LORA, build_tiny=MOE_TINY, random_shapes={},
           build_random=MOE_RANDOM, llama=LlamaNames(text_arch="qwen35moe", **LLAMA),
           keep_16bit=(*KEEP_16BIT, "shared_expert_gate"), **COMMON),
)
