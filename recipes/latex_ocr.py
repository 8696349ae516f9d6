"""Qwen2-VL-7B QLoRA that writes LaTeX for an image of a formula (Unsloth's vision notebook task).

    python train.py --recipe latex_ocr
"""

from recipes.base import BASE

RECIPE = {
    **BASE,
    "dataset": "latex_ocr",
    # the preset's columns, spelled out so dataset=hf:LOCAL_COPY reads a local copy the same way
    "dataset_columns": ["image=image", "answer=text", "instruction=Write the LaTeX representation for this image."],
    "system_prompt": "Write the LaTeX representation for this image.",
    "max_pixels": 200704,  # formulas are small, wide images; 256 tokens is plenty
    "per_device_train_batch_size": 2,
    "gradient_accumulation_steps": 4,
    "max_steps": 300,  # as in Unsloth's notebook: the format is learned in a few hundred steps
    "max_length": 1024,
    # a formula is read, not answered: CER (with WER and exact match ignoring spacing) is reported, selects the
    # best checkpoint and is GRPO's reward; one wrong character is a small error, not a wrong answer
    "metric_for_best_model": "cer",
    "max_completion_length": 256,  # tokens: long formulas run past 100; chart answers' 32 would cut them off
}
