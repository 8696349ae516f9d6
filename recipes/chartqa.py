"""QLoRA of Qwen2-VL-7B-Instruct on ChartQA through Unsloth, sized for one 24 GB GPU.

    python train.py --recipe chartqa
    python train.py --recipe chartqa --set limit=2000 --set max_steps=100   # a quick look first

The TRL cookbook trains the same model on the same data in bf16 LoRA on an 80 GB A100;
4-bit weights and Unsloth's offloaded gradient checkpointing bring it under 24 GB.
"""

from recipes.base import BASE

RECIPE = {
    **BASE,
    "model_name_or_path": "Qwen/Qwen2-VL-7B-Instruct",
    "dataset": "chartqa",
    "system_prompt": (  # the cookbook's prompt, so base+prompt is the fair baseline in eval.py
        "You are a Vision Language Model specialized in interpreting visual data from chart images. "
        "Your task is to analyze the provided chart image and respond to queries with concise answers, "
        "usually a single word, number, or short phrase. Focus on delivering accurate, succinct answers "
        "based on the visual information. Avoid additional explanation unless absolutely necessary."
    ),
    "max_pixels": 313600,  # <= 400 image tokens: ChartQA's 800x600 charts stay legible
    "per_device_train_batch_size": 2,
    "gradient_accumulation_steps": 8,  # effective batch 16
    "num_train_epochs": 1.0,  # 28k rows; a second epoch overfits the short answers
    "learning_rate": 2e-4,
    "max_length": 1024,  # 400 image tokens + system prompt + question + answer with room to spare
    "eval_split": "val",  # ChartQA's validation split (1,920 questions); test stays for eval.py
    "eval_steps": 200,  # ~9 looks per epoch (1,769 steps); each scores eval_samples questions
    "eval_samples": 300,  # a fixed seeded subset: ~1 minute of 7B generation, +-3 points of accuracy
    "load_best_model_at_end": True,  # save_steps (200) is a multiple of eval_steps
}
