"""Defaults for every recipe. Keys are the names of the library arguments they feed:
peft.LoraConfig / FastVisionModel.get_peft_model, trl.SFTConfig (trl.GRPOConfig for method=grpo), and the
model's image processor.

Not run directly: a recipe is `RECIPE = {**BASE, ...}`. Any key can be changed from the command line:
    python train.py --recipe chartqa --set learning_rate=1e-4 --set max_steps=200
"""

BASE = {
    # --- method --------------------------------------------------------------------------------------
    "method": "sft",  # sft | grpo; grpo continues the run named by init_from with TRL's GRPOTrainer
    # The run method=grpo starts from: a finished run folder (e.g. runs/demo) or one of its checkpoints/checkpoint-N.
    # Its adapter or weights are the start, and its model keys (model_name_or_path, finetune, load_in_4bit, LoRA
    # shape, system_prompt, pixel limits) replace this recipe's, so eval.py, merge.py and infer.py load the GRPO
    # run as they loaded that one.
    "init_from": "",
    # --- model -----------------------------------------------------------------------------------
    # hub id, local folder, or a model the kit builds: `tiny[:FAMILY]` (tiny:qwen2-vl, tiny:qwen2.5-vl) or
    # `random:SHAPE` (random:qwen2-vl-7b, random:qwen2.5-vl-3b, ...: README "Models")
    "model_name_or_path": "Qwen/Qwen2-VL-7B-Instruct",
    "backend": "auto",  # auto | unsloth | hf; auto = unsloth when CUDA is present and unsloth imports
    "load_in_4bit": True,  # QLoRA: the frozen base in NF4, the adapter in 16-bit
    "precision": "auto",  # auto | bf16 | fp16 | fp32; auto = bf16 where the GPU has it, fp16 (T4), fp32 on CPU
    "finetune": "lora",  # lora | full; full only makes sense for the tiny model
    # Unsloth backend only. False: load model_name_or_path itself (use_exact_model_name), quantized on load, as
    # --plan and the hf backend assume. True: Unsloth's pre-quantized "dynamic 4-bit" copy (some layers kept in
    # 16-bit: a little more memory, a little closer to the 16-bit model; the adapter then names that repository).
    "unsloth_dynamic_4bit": False,
    # --- LoRA (peft.LoraConfig names, and Unsloth's finetune_* switches for which layers get adapters) --
    "lora_r": 16,
    "lora_alpha": 16,  # alpha = r: an update scale of 1, Unsloth's default for vision models
    "lora_dropout": 0.0,  # 0 lets Unsloth use its fast LoRA kernels
    "finetune_vision_layers": False,  # the vision tower is already good at charts; adapters there cost memory
    "finetune_language_layers": True,
    "finetune_attention_modules": True,
    "finetune_mlp_modules": True,
    # MoE models (Qwen3-VL-MoE, Qwen3.5-MoE): LoRA on the routed experts too (peft's target_parameters; hf backend).
    # Off: the experts hold most of the weights and the router sends each token to a few of them
    "finetune_experts": False,
    "gradient_checkpointing": True,  # Unsloth's offloaded checkpointing on its path; the only way 7B fits 24 GB
    # --- data ------------------------------------------------------------------------------------
    # chartqa | latex_ocr | synthetic | synthetic_text (digits to read) | jsonl:PATH (.jsonl/.json) |
    # hf:HUB_ID_OR_FOLDER | llamafactory:DIR#NAME
    "dataset": "chartqa",
    # hf: columns as ROLE=COLUMN (image, question, answer, subset; instruction=TEXT for one fixed question);
    # [] = the preset's own (ChartQA's image, query, label, human_or_machine for hf:)
    "dataset_columns": [],
    "dataset_split": "train",
    "limit": 0,  # 0 = every row of the split
    "system_prompt": "",  # empty = the chat template's default system message
    "min_pixels": 3136,  # 56x56: the Qwen VL processors' own floor
    "max_pixels": 313600,  # 640x490 -> at most 400 image tokens a chart; ChartQA text stays readable
    # videos (a row's "videos": a file or a list of frame files): frames sampled a second, and at most this many
    # a video (its frames are sized by min_pixels/max_pixels like images; two frames make one token grid)
    "fps": 2.0,  # Qwen's own sampling rate (qwen-vl-utils)
    "max_frames": 16,  # 8 token grids: a 640x490 video stays within 3,200 tokens
    "synthetic_seed": 0,
    "synthetic_num_train": 2000,
    "synthetic_num_test": 200,
    "synthetic_chart_types": ["bar", "line"],
    "synthetic_question_types": ["count", "max", "min", "value"],
    "synthetic_layout": "chartqa",  # aligned = small token-aligned charts a tiny model can learn
    "synthetic_size": 140,  # side of an aligned chart in pixels (a multiple of synthetic_grid)
    # pixels per vision token that aligned charts' bar slots line up with; 0 = the model's own (its family's
    # patch x merge, filled in by train.py and saved in run_config.json)
    "synthetic_grid": 0,
    # --- training (trl.SFTConfig names) -----------------------------------------------------------
    "per_device_train_batch_size": 2,
    "gradient_accumulation_steps": 4,
    "learning_rate": 2e-4,  # the usual QLoRA rate (QLoRA paper, Unsloth and TRL notebooks)
    "num_train_epochs": 1.0,  # a float: 0.5 = half an epoch, as the trainer takes it
    "max_steps": -1,  # > 0 overrides num_train_epochs
    "warmup_steps": 10,
    "lr_scheduler_type": "linear",
    "optim": "adamw_8bit",  # bitsandbytes 8-bit Adam: a quarter of the optimizer memory
    "weight_decay": 0.01,
    "max_grad_norm": 1.0,
    "logging_steps": 10,
    "save_steps": 200,
    "save_total_limit": 2,
    "seed": 3407,
    # processes that decode each batch's images beside the GPU step (a 7B step takes seconds, a batch's
    # decode ~50 ms); 0 = in the training process
    "dataloader_num_workers": 2,
    "max_length": 2048,  # tokens, image tokens included; a longer sample is an error, never cut in an image
    # Pack each micro-batch's samples into rows of up to max_length tokens (whole samples, attention kept within
    # each) instead of padding them to the longest: the same loss and steps, less compute on padding. Off until
    # a recipe has measured it on its data (bench.py --packing); eval and generation never pack.
    "packing": False,
    "train_on_responses_only": True,  # loss only on the assistant's answers, not on the question
    # --- GRPO (method=grpo; trl.GRPOConfig names) ----------------------------------------------------
    # per_device_train_batch_size counts completions there: batch / num_generations questions a step
    "num_generations": 8,  # answers sampled per question; the group they are ranked in (TRL's default)
    # tokens: the longest answer generated, by GRPO and by evaluation (eval.py, training's held-out questions);
    # chart answers are short
    "max_completion_length": 32,
    "beta": 0.04,  # KL to the starting model: keeps it near what SFT taught (DeepSeekMath's 0.04; TRL's default 0)
    "temperature": 1.0,  # sample from the model as it is: the group needs different answers to rank
    "top_p": 1.0,
    "num_iterations": 1,  # updates per generated batch (1: always on-policy)
    "epsilon": 0.2,  # PPO clip range of the probability ratio
    "loss_type": "dapo",  # TRL's default: token losses averaged over the batch's tokens, no length bias
    "scale_rewards": "group",  # advantages divided by each group's reward std (GRPO as published)
    # relaxed_accuracy, short_answer: being right counts; no extra words only breaks ties between right answers.
    # Text, as every list key is kept (--set reward_weights=1,0.5 and a config file give the same values).
    # 0.25, not 0.2: a group of equal rewards must have exactly zero spread in float32. Eight rewards of 1.2
    # average to 1.2 plus 1e-7, which TRL divides by (std + 1e-4) into advantages of 1e-3, and which its
    # frac_reward_zero_std (a 1e-8 tolerance) counts as spread
    "reward_weights": ["1.0", "0.25"],
    # Ask GRPO only the training rows of these question types (a row's "qtype": synthetic charts have one); empty =
    # all. Types SFT already answers right give groups with no spread, so no learning signal, at a full step's cost
    "grpo_question_types": [],
    # --- held-out evaluation during training ------------------------------------------------------
    "eval_split": "",  # a split of the dataset to evaluate on ("" = none); never trained on
    "eval_fraction": 0.0,  # without a split: hold out this share of the training rows (written to heldout.jsonl)
    "eval_steps": 0,  # evaluate every N steps (and at the last): loss + the task's metric by greedy generation;
    # 0 = never; nothing either without held-out rows
    "eval_samples": 0,  # the first N held-out questions (a fixed, seeded order) are scored; 0 = all
    "load_best_model_at_end": False,  # keep the checkpoint with the best held-out metric as the final model
    # The task's metric (kit/evaluate/task_metrics.py), named as transformers' TrainingArguments names it: held-out
    # evaluation selects the best checkpoint by it, eval.py reports it first (with its companions), GRPO rewards it.
    # relaxed_accuracy (charts) | exact_match | anls (documents) | cer | wer (OCR, LaTeX) | rougeL (free answers)
    "metric_for_best_model": "relaxed_accuracy",
    "report_to": "none",  # none | tensorboard | wandb | trackio (transformers' integrations; logs in <run>/logs)
}
