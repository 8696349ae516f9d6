"""16-bit LoRA of Qwen3.5-9B on ChartQA through Unsloth, sized for one 24 GB GPU.

    python train.py --recipe chartqa_qwen35_9b
    python train.py --recipe chartqa_qwen35_9b --plan --gpu 24GB --set model_name_or_path=random:qwen3.5-9b

Qwen3.5 mixes Gated DeltaNet linear attention (three layers in four) with gated full attention; LoRA adapts the
DeltaNet projections (in_proj_qkv, in_proj_z, in_proj_b, in_proj_a, out_proj) with the attention and MLP ones.
Unsloth advises against QLoRA for Qwen3.5 (its 4-bit quantization error is larger than usual) and trains 16-bit
LoRA (its figure: 9B in ~22 GB), so the base stays in bf16 here. Thinking is off for these one-word answers:
the template's empty <think></think> block sits in the prompt, outside the loss.
"""

from recipes.chartqa import RECIPE as CHARTQA

TOKEN = 32 * 32  # pixels of one merged vision token in Qwen3.5 (patch 16 x merge 2, a side)

RECIPE = {
    **CHARTQA,
    "model_name_or_path": "Qwen/Qwen3.5-9B",  # 9.4B: text 4096 / 32 layers (8 full attention), vision 0.46B
    "load_in_4bit": False,  # 16-bit LoRA, as Unsloth advises for Qwen3.5 (see above); 19 GB of bf16 weights
    "min_pixels": 4 * TOKEN,  # 64x64: the smallest image the processor cuts (2x2 tokens)
    "max_pixels": 256 * TOKEN,  # <= 256 image tokens (512x512): what leaves room for the bf16 weights in 24 GB
    "per_device_train_batch_size": 1,  # activations beside 19 GB of weights
    "gradient_accumulation_steps": 16,  # effective batch 16, as the other ChartQA recipes
}
