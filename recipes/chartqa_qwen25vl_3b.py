"""QLoRA of Qwen2.5-VL-3B-Instruct on ChartQA: the Qwen2.5-VL recipe for a 12-16 GB GPU or a quicker turn.

    python train.py --recipe chartqa_qwen25vl_3b
    python train.py --recipe chartqa_qwen25vl_3b --plan --gpu 16GB --set model_name_or_path=random:qwen2.5-vl-3b
"""

from recipes.chartqa import RECIPE as CHARTQA

RECIPE = {
    **CHARTQA,
    "model_name_or_path": "Qwen/Qwen2.5-VL-3B-Instruct",
    "per_device_train_batch_size": 4,  # hidden 2048 (36 layers): activations about half of 7B's, as for chartqa_2b
    "gradient_accumulation_steps": 4,  # effective batch 16, as for 7B
}
