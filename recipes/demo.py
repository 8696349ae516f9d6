"""The laptop demo: the tiny random-initialised Qwen2-VL learns to read synthetic bar charts on the CPU.

    python train.py --recipe demo            # ~1 min of training on two cores; ~2 min the first time (draws charts)
    python train.py --recipe demo --set model_name_or_path=tiny:qwen2.5-vl     # the tiny Qwen2.5-VL instead
    make demo                                 # train -> eval -> merge -> GGUF -> infer

Settings measured to learn (docs/demo.md says why each is what it is): only full fine-tuning of the tiny
model learns to use the image; LoRA on a random base learns the answer format and ignores the chart.
"""

from recipes.base import BASE

# How the tiny model is trained on a CPU, for every laptop demo that teaches it a skill from scratch (this one and
# demo_ocr): the schedule measured to learn (docs/demo.md).
TINY_FROM_SCRATCH = {
    "model_name_or_path": "tiny",
    "backend": "hf",  # no GPU assumed
    "load_in_4bit": False,  # 0.48M parameters: nothing to save by quantising
    "finetune": "full",  # LoRA on a random base never learns to look at the image
    "gradient_checkpointing": False,  # activations are tiny; recomputing them only costs time
    "per_device_train_batch_size": 8,
    "gradient_accumulation_steps": 1,
    "learning_rate": 3e-3,  # with the tiny model's wider init (0.05), as calibrated
    "max_steps": 1500,  # a step count, not a time budget: step times vary ~40 % on shared machines
    "warmup_steps": 50,
    "lr_scheduler_type": "cosine",
    "optim": "adamw_torch",  # 8-bit Adam needs CUDA
    "weight_decay": 0.0,
    "logging_steps": 50,
    "save_steps": 500,
    "dataloader_num_workers": 0,  # images of a few tokens decode in microseconds; workers would only cost start-up
}

RECIPE = {
    **BASE,
    **TINY_FROM_SCRATCH,
    "dataset": "synthetic",
    "synthetic_num_train": 3000,  # rendered once (~30 s) and cached
    "synthetic_num_test": 200,
    "synthetic_layout": "aligned",  # bar slots on the model's vision-token columns: the only layout it learned
    "synthetic_size": 140,  # 5x5 = 25 image tokens on Qwen2-VL's and Qwen2.5-VL's grid (synthetic_grid: the model's)
    "synthetic_chart_types": ["bar"],
    "synthetic_question_types": ["count", "max"],  # learned in minutes; exact values are not
    "min_pixels": 3136,
    "max_pixels": 19600,  # 140x140: the chart is never resized
    "max_length": 256,
}
