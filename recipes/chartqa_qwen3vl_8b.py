"""QLoRA of Qwen3-VL-8B-Instruct on ChartQA through Unsloth, sized for one 24 GB GPU: the chartqa recipe on the
Qwen3 generation (16-pixel patches merged 2x2: one token per 32 x 32 pixels; DeepStack mergers feed vision features
into the first LLM layers; the Instruct template has no thinking, and the kit asks for thinking off anyway).

    python train.py --recipe chartqa_qwen3vl_8b
    python train.py --recipe chartqa_qwen3vl_8b --plan --gpu 24GB --set model_name_or_path=random:qwen3-vl-8b
"""

from recipes.chartqa import RECIPE as CHARTQA

TOKEN = 32 * 32  # pixels of one merged vision token in Qwen3-VL (patch 16 x merge 2, a side)

RECIPE = {
    **CHARTQA,
    # 8.8B (text 4096 / 36 layers, vision 0.58B with 3 DeepStack mergers): 4-bit weights keep it under 24 GB
    "model_name_or_path": "Qwen/Qwen3-VL-8B-Instruct",
    "min_pixels": 4 * TOKEN,  # 64x64: the smallest image Qwen3-VL's processor cuts (2x2 tokens)
    "max_pixels": 400 * TOKEN,  # <= 400 image tokens, as the Qwen2-VL recipe: ChartQA's 800x600 charts stay legible
}
