"""QLoRA of Qwen2.5-VL-7B-Instruct on ChartQA through Unsloth, sized for one 24 GB GPU: the chartqa recipe on the
next generation (same chat markup and 28-pixel tokens; a SwiGLU vision MLP and window attention in its tower).

    python train.py --recipe chartqa_qwen25vl_7b
    python train.py --recipe chartqa_qwen25vl_7b --plan --gpu 24GB     # the memory estimate, by module
    python train.py --recipe chartqa_qwen25vl_7b --plan --gpu 24GB --set model_name_or_path=random:qwen2.5-vl-7b
"""

from recipes.chartqa import RECIPE as CHARTQA

RECIPE = {
    **CHARTQA,
    # 7.6B hidden 3584 / 28 layers like Qwen2-VL-7B; its vision tower is 0.67B in bf16, so 4-bit keeps it at 24 GB
    "model_name_or_path": "Qwen/Qwen2.5-VL-7B-Instruct",
}
