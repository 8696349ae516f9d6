"""The one way train.py and bench.py turn a recipe into TRL's trainer, so the benchmark times the training
that users run. Imports happen inside: transformers/trl only after the backend is chosen."""


def sft_config(recipe: dict, precision: str, backend: str, output_dir: str, **changes):
    """trl.SFTConfig from the recipe's keys (named after its arguments); `changes` override any of them."""
    import torch
    from trl import SFTConfig

    values = dict(
        output_dir=output_dir,
        per_device_train_batch_size=recipe["per_device_train_batch_size"],
        gradient_accumulation_steps=recipe["gradient_accumulation_steps"],
        learning_rate=recipe["learning_rate"], num_train_epochs=recipe["num_train_epochs"],
        max_steps=recipe["max_steps"], warmup_steps=recipe["warmup_steps"],
        lr_scheduler_type=recipe["lr_scheduler_type"], optim=recipe["optim"],
        weight_decay=recipe["weight_decay"], max_grad_norm=recipe["max_grad_norm"],
        logging_steps=recipe["logging_steps"], logging_first_step=True, save_steps=recipe["save_steps"],
        save_total_limit=recipe["save_total_limit"], seed=recipe["seed"], data_seed=recipe["seed"],
        bf16=precision == "bf16", fp16=precision == "fp16",
        # Unsloth does its own (offloaded) checkpointing, switched on in from_pretrained
        gradient_checkpointing=recipe["gradient_checkpointing"] and backend == "hf",
        gradient_checkpointing_kwargs={"use_reentrant": False},
        remove_unused_columns=False, dataset_kwargs={"skip_prepare_dataset": True},
        max_length=None,  # the collator checks lengths: a cut inside an image would break the model
        report_to="none", disable_tqdm=True, dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        # Without it accelerate never picks gloo on a CPU-only machine: under torchrun every process then
        # trains its own copy ("process group is initialized, but parallel_mode != DISTRIBUTED").
        use_cpu=not torch.cuda.is_available(),
    )
    values.update(changes)
    return SFTConfig(**values)


def sft_trainer_class():
    """TRL's SFTTrainer; on the CPU with the model's own loss, since trl's fused LM-head loss is a Triton
    kernel with no CPU path (the number is the same)."""
    import torch
    from transformers import Trainer
    from trl import SFTTrainer

    if torch.cuda.is_available():
        return SFTTrainer

    class PlainLossSFTTrainer(SFTTrainer):
        compute_loss = Trainer.compute_loss

    return PlainLossSFTTrainer


def indexed_dataset(samples, collator):
    """(datasets.Dataset of row numbers, a collator that looks the samples up).

    trl wants a datasets.Dataset, but turning samples into Arrow re-encodes every image (minutes and
    gigabytes for ChartQA's 28k charts); row numbers cost nothing and keep the sampler's order the same."""
    from datasets import Dataset

    def collate(rows):
        return collator([samples[row["row"]] for row in rows])

    return Dataset.from_dict({"row": list(range(len(samples)))}), collate
