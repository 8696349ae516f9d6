"""QLoRA of Qwen2-VL-2B-Instruct on ChartQA: the same recipe for a 12-16 GB GPU or a quicker turn.

    python train.py --recipe chartqa_2b
"""

from recipes.chartqa import RECIPE as CHARTQA

RECIPE = {
    **CHARTQA,
    "model_name_or_path": "Qwen/Qwen2-VL-2B-Instruct",
    "per_device_train_batch_size": 4,  # the 2B activations are about half of 7B's
    "gradient_accumulation_steps": 4,  # effective batch 16, as for 7B
}
