"""The second laptop demo: the tiny random-initialised Qwen2-VL learns to read numbers the kit draws itself, scored
by character error rate.

    python train.py --recipe demo_ocr        # a minute or two of training on two cores
    make demo-ocr                            # train -> eval: CER of fine-tuned vs base vs shuffled images

Set up as the chart demo (recipes/demo.py, docs/demo.md): full fine-tuning of the tiny model, and images whose
content lines up with its vision tokens (one bold digit per 28-pixel token). Numbers of 2 to 3 digits were read
within 1,000 steps; with up to 5 digits the loss stayed on the "right length, digits guessed" plateau
(about 1.8) through 2,000 steps.
"""

from recipes.base import BASE

RECIPE = {
    **BASE,
    "model_name_or_path": "tiny",
    "backend": "hf",  # no GPU assumed
    "load_in_4bit": False,  # a tiny model: nothing to save by quantising
    "finetune": "full",  # LoRA on a random base never learns to look at the image
    "gradient_checkpointing": False,  # activations are tiny; recomputing them only costs time
    "dataset": "synthetic_text",
    "synthetic_num_train": 3000,  # drawn once (seconds) and cached
    "synthetic_num_test": 200,
    "synthetic_size": 84,  # 3 digits at most, one per token column of Qwen2-VL's 28-pixel grid
    # 84x28 = 2,352 pixels, below the processors' default floor (3,136): both limits at the strip's size, so it is
    # never resized and each digit stays in its token
    "min_pixels": 2352,
    "max_pixels": 2352,
    "metric_for_best_model": "cer",  # reading: character error rate, with WER and exact match beside it
    "max_completion_length": 8,  # 3 digits (one token each), the end of turn, and room to ramble
    "per_device_train_batch_size": 8,
    "gradient_accumulation_steps": 1,
    "learning_rate": 3e-3,  # as the chart demo, with the tiny model's wider init
    "max_steps": 1500,  # a step count, not a time budget: step times vary on shared machines
    "warmup_steps": 50,
    "lr_scheduler_type": "cosine",
    "optim": "adamw_torch",  # 8-bit Adam needs CUDA
    "weight_decay": 0.0,
    "logging_steps": 50,
    "save_steps": 500,
    "max_length": 128,
    "dataloader_num_workers": 0,  # 5-token strips decode in microseconds
}
