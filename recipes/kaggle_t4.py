"""Qwen2-VL-7B QLoRA on ChartQA on a free Kaggle/Colab T4 (16 GB, no bf16: fp16 is chosen automatically).

    python train.py --recipe kaggle_t4
"""

from recipes.chartqa import RECIPE as CHARTQA

RECIPE = {
    **CHARTQA,
    "precision": "fp16",  # the T4 has no bf16; said here so that --plan on another machine plans for fp16 too
    "per_device_train_batch_size": 1,  # 16 GB: one sample at a time
    "gradient_accumulation_steps": 16,  # effective batch 16, as on 24 GB
    "max_pixels": 200704,  # 448x448-equivalent: <= 256 image tokens, to stay under 14.5 GB
    "max_length": 768,
    "limit": 5000,  # a T4 does about 0.1 step/s; 5,000 rows is a Kaggle session, not a day
}
