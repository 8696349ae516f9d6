"""The one way train.py and bench.py turn a recipe into TRL's trainer, so the benchmark times the training
that users run. Imports happen inside: transformers/trl only after the backend is chosen."""

import os
import random
from pathlib import Path

from kit.paths import write_jsonl

# In-training accuracy uses eval.py's defaults, so the two agree on the same checkpoint and questions.
EVAL_MAX_NEW_TOKENS = 32
EVAL_BATCH_SIZE = 8


def sft_config(recipe: dict, precision: str, backend: str, output_dir: str, **changes):
    """trl.SFTConfig from the recipe's keys (named after its arguments); `changes` override any of them."""
    import torch
    from trl import SFTConfig

    # eval_steps without held-out rows (eval_split= and no eval_fraction) evaluates nothing
    evaluating = bool(recipe["eval_steps"] and (recipe["eval_split"] or recipe["eval_fraction"]))
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
        disable_tqdm=True,
        # images are decoded per batch in the collator; workers do it beside the training step
        dataloader_num_workers=recipe["dataloader_num_workers"],
        dataloader_persistent_workers=recipe["dataloader_num_workers"] > 0,
        dataloader_pin_memory=torch.cuda.is_available(),
        report_to=recipe["report_to"],
        # held-out evaluation: loss and relaxed accuracy on the same fixed questions (see HeldOutAccuracy)
        eval_strategy="steps" if evaluating else "no", eval_steps=recipe["eval_steps"] if evaluating else None,
        per_device_eval_batch_size=recipe["per_device_train_batch_size"], prediction_loss_only=True,
        load_best_model_at_end=recipe["load_best_model_at_end"] and evaluating,
        metric_for_best_model="relaxed_accuracy", greater_is_better=True,
        # Without it accelerate never picks gloo on a CPU-only machine: under torchrun every process then
        # trains its own copy ("process group is initialized, but parallel_mode != DISTRIBUTED").
        use_cpu=not torch.cuda.is_available(),
    )
    values["report_to"] = [] if values["report_to"] == "none" else [values["report_to"]]
    if "tensorboard" in values["report_to"]:  # event files in <run>/logs, beside metrics.jsonl
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(Path(output_dir).parent / "logs")
    values.update(changes)
    return SFTConfig(**values)


def sft_trainer_class():
    """TRL's SFTTrainer; on the CPU with the model's own loss, since trl's fused LM-head loss is a Triton
    kernel with no CPU path (the number is the same)."""
    import torch
    from transformers import Trainer
    from trl import SFTTrainer

    class HeldOutAccuracy(SFTTrainer):
        """Adds relaxed accuracy by greedy generation on the held-out questions to each evaluation (the
        metric that `load_best_model_at_end` keeps the best checkpoint by)."""

        eval_questions, eval_system_prompt, eval_backend = None, "", "hf"

        def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                            metric_key_prefix="eval"):
            output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                             metric_key_prefix)
            if self.eval_questions is not None:
                output.metrics[f"{metric_key_prefix}_relaxed_accuracy"] = self.relaxed_accuracy()
                output.metrics[f"{metric_key_prefix}_questions"] = len(self.eval_questions)
            return output

        def relaxed_accuracy(self) -> float:
            from kit.generate import generate_answers, prepare_for_inference
            from kit.metrics import relaxed_correct

            model, training = self.model, self.model.training
            prepare_for_inference(model, self.eval_backend)
            try:
                answers, _ = generate_answers(model, self.processing_class, self.eval_questions,
                                              self.eval_system_prompt, EVAL_MAX_NEW_TOKENS, EVAL_BATCH_SIZE)
            finally:
                if self.eval_backend == "unsloth":
                    from unsloth import FastVisionModel

                    FastVisionModel.for_training(model)
                model.train(training)
            flags = [relaxed_correct(a, s["answers"]) for a, s in zip(answers, self.eval_questions)]
            # every answer, so a score can be checked (and compared with eval.py on the same checkpoint)
            folder = Path(self.args.output_dir).parent / "heldout_answers"
            folder.mkdir(exist_ok=True)
            write_heldout(folder / f"step-{self.state.global_step}.jsonl",
                          [{"id": s.get("id"), "answer": a, "references": s["answers"], "relaxed": f}
                           for s, a, f in zip(self.eval_questions, answers, flags)])
            return sum(flags) / len(flags)

    if torch.cuda.is_available():
        return HeldOutAccuracy

    class PlainLossSFTTrainer(HeldOutAccuracy):
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


def indexed_datasets(samples, eval_samples, collator):
    """indexed_dataset for a training set and an evaluation set sharing one collator: eval rows are looked
    up in `eval_samples` and bypass the token counter (tokens/s is about training) and packing (held-out
    loss is computed on padded batches, as eval.py sees the model)."""
    from datasets import Dataset

    plain = getattr(collator, "collator", collator)
    unpacked = getattr(plain, "padded", plain)

    def collate(rows):
        if "eval_row" in rows[0]:
            return unpacked([eval_samples[row["eval_row"]] for row in rows])
        return collator([samples[row["row"]] for row in rows])

    eval_dataset = Dataset.from_dict({"eval_row": list(range(len(eval_samples)))}) if eval_samples else None
    return Dataset.from_dict({"row": list(range(len(samples)))}), eval_dataset, collate


def hold_out(recipe: dict, train_samples, eval_split_samples=None):
    """(training samples, held-out samples in a fixed seeded order, their rows for heldout.jsonl).

    With `eval_split` the held-out rows are that split's; with `eval_fraction` they are taken out of the
    training rows here, before anything else sees them, so no training batch can hold one."""
    if eval_split_samples is not None:
        pool, split = eval_split_samples, recipe["eval_split"]
        order = list(range(len(pool)))
    elif recipe["eval_fraction"] > 0:
        pool, split = train_samples, recipe["dataset_split"]
        count = max(1, round(len(pool) * recipe["eval_fraction"]))
        order = random.Random(recipe["seed"]).sample(range(len(pool)), count)
        kept = sorted(set(range(len(pool))) - set(order))
        train_samples = pool.select(kept) if hasattr(pool, "select") else [pool[i] for i in kept]
    else:
        return train_samples, None, []
    random.Random(recipe["seed"]).shuffle(order)  # the first eval_samples of this order are scored in training
    held = pool.select(order) if hasattr(pool, "select") else [pool[i] for i in order]
    rows = []
    described = held.without_images() if hasattr(held, "without_images") else held  # no pixels read for this
    for position, (index, sample) in enumerate(zip(order, described)):
        image = (sample.get("images") or [None])[0]
        rows.append({"split": split, "index": index, "id": sample.get("id"),
                     "question": " ".join(p.get("text", "") for m in sample.get("messages", []) if m["role"] == "user"
                                          for p in (m["content"] if isinstance(m["content"], list) else [])),
                     "answers": sample.get("answers"), "image": image if isinstance(image, str) else None,
                     "during_training": not recipe["eval_samples"] or position < recipe["eval_samples"]})
    return train_samples, held, rows


def write_heldout(path: Path, rows: list[dict]):
    write_jsonl(path, rows)


def eval_questions(recipe: dict, held, on_bad_row: str, run_dir: Path | None):
    """The held-out questions scored during training (the first eval_samples), checked like eval.py does;
    None without eval_steps."""
    if held is None or not recipe["eval_steps"]:
        return None
    from data.lint import lint, split_bad_rows

    count = min(recipe["eval_samples"] or len(held), len(held))
    questions = held.select(range(count)) if hasattr(held, "select") else held[:count]
    questions = split_bad_rows(questions, lint(questions, duplicates=False), on_bad_row,
                               run_dir / "skipped-heldout.jsonl" if run_dir else None)
    return questions if len(questions) else None
