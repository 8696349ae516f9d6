"""QLoRA of Qwen3-VL-4B-Instruct on ChartQA: the Qwen3-VL-8B recipe for a 12-16 GB GPU or a quicker turn.

    python train.py --recipe chartqa_qwen3vl_4b
    python train.py --recipe chartqa_qwen3vl_4b --plan --gpu 24GB --set model_name_or_path=random:qwen3-vl-4b
"""

from recipes.chartqa_qwen3vl_8b import RECIPE as QWEN3VL_8B

RECIPE = {
    **QWEN3VL_8B,
    "model_name_or_path": "Qwen/Qwen3-VL-4B-Instruct",  # 4.4B: text 2560 / 36 layers, tied embeddings
    "per_device_train_batch_size": 4,  # about half the 8B's activations a sample
    "gradient_accumulation_steps": 4,  # effective batch 16, as for 8B
}
