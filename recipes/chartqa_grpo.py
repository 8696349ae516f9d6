"""GRPO after the ChartQA QLoRA: Qwen2-VL-7B in 4-bit with the chartqa run's adapter, rewarded by ChartQA's relaxed
accuracy (what eval.py reports), through Unsloth's patched GRPOTrainer on one 24 GB GPU.

    python train.py --recipe chartqa                                   # the SFT run it starts from: runs/chartqa
    python train.py --recipe chartqa_grpo --plan                       # check the data and the memory first
    python train.py --recipe chartqa_grpo --output runs/chartqa-grpo
    python eval.py runs/chartqa-grpo --compare base,finetuned          # ChartQA's test split, as for runs/chartqa

The model keys (the 7B base, 4-bit, LoRA shape, the cookbook's system prompt, max_pixels) come from the chartqa
run, so the adapter continues on exactly the model it was trained on. Memory: the 4-bit base (~5.5 GB) is shared
by the policy and the reference (the adapter switched off is the reference), so a group adds activations, not a
second model; generation of 2 x 4 answers of <= 32 tokens and a batch of 8 completions with offloaded gradient
checkpointing stay near the SFT recipe's peak. Not yet measured on a GPU.
"""

from recipes.chartqa import RECIPE as CHARTQA

RECIPE = {
    **CHARTQA,
    "method": "grpo",
    "init_from": "runs/chartqa",  # where `python train.py --recipe chartqa` leaves the SFT run
    "num_generations": 4,  # 4 answers per chart: a group with a spread at a quarter of the generation cost of 16
    "per_device_train_batch_size": 8,  # completions: 2 questions a micro-batch
    "gradient_accumulation_steps": 4,  # 8 questions (32 completions) per optimizer step, generated together
    "max_completion_length": 32,  # eval.py's answer length; ChartQA answers are a word or a number
    "learning_rate": 5e-6,  # RL on a trained adapter: small steps (TRL's GRPO default is 1e-6; LoRA takes more)
    "beta": 0.04,  # KL to the SFT adapter; with LoRA TRL keeps a frozen copy of it as the reference
    "temperature": 1.0,
    "num_train_epochs": 1.0,
    "max_steps": 500,  # 4,000 questions of the 28k: GRPO gains come early; eval.py says if more would help
    "warmup_steps": 10,
    "lr_scheduler_type": "constant_with_warmup",
    "eval_steps": 0,  # GRPO does not evaluate during training: score checkpoints with eval.py
    "load_best_model_at_end": False,
    "save_steps": 100,
    "logging_steps": 5,
}
