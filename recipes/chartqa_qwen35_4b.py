"""16-bit LoRA of Qwen3.5-4B on ChartQA: the Qwen3.5-9B recipe (bf16 base, as Unsloth advises for Qwen3.5; its
figure: 4B in ~10 GB) for a 16 GB GPU, with the ChartQA recipes' 400-token charts.

    python train.py --recipe chartqa_qwen35_4b
    python train.py --recipe chartqa_qwen35_4b --plan --gpu 24GB --set model_name_or_path=random:qwen3.5-4b
"""

from recipes.chartqa_qwen35_9b import RECIPE as QWEN35_9B
from recipes.chartqa_qwen35_9b import TOKEN

RECIPE = {
    **QWEN35_9B,
    "model_name_or_path": "Qwen/Qwen3.5-4B",  # 4.5B: text 2560 / 32 layers, tied embeddings; 9 GB in bf16
    "max_pixels": 400 * TOKEN,  # <= 400 image tokens, as the Qwen2-VL and Qwen3-VL recipes
    "per_device_train_batch_size": 2,
    "gradient_accumulation_steps": 8,  # effective batch 16
}
