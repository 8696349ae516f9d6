"""TRL's SFTTrainer as train.py and bench.py run it: its config from the recipe, and held-out accuracy in each
evaluation. bench.py times the training that users run because both build it here.

This module imports trl (and so transformers) at its top: import it only after kit.backend.select has chosen the
backend, because Unsloth must patch transformers and trl before anyone imports them.
"""

import os
from pathlib import Path

import torch
from transformers import Trainer
from transformers.trainer_callback import PrinterCallback
from trl import SFTConfig, SFTTrainer

from kit.evaluate import task_metrics
from kit.model import adapter_in_fp32
from kit.train.heldout import indexed_datasets, write_heldout

# In-training scores use eval.py's defaults (answers up to the recipe's max_completion_length tokens), so the two
# agree on the same checkpoint and questions.
EVAL_BATCH_SIZE = 8


def sft_config(recipe: dict, precision: str, backend: str, output_dir: str, **changes) -> SFTConfig:
    """trl.SFTConfig from the recipe's keys (named after its arguments); `changes` override any of them."""
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
        # held-out evaluation: loss and the task's metric on the same fixed questions (see HeldOutAccuracy)
        eval_strategy="steps" if evaluating else "no", eval_steps=recipe["eval_steps"] if evaluating else None,
        per_device_eval_batch_size=recipe["per_device_train_batch_size"], prediction_loss_only=True,
        load_best_model_at_end=recipe["load_best_model_at_end"] and evaluating,
        metric_for_best_model=recipe["metric_for_best_model"],
        greater_is_better=task_metrics.higher_is_better(recipe["metric_for_best_model"]),  # an error rate: lower
        # Without it accelerate never picks gloo on a CPU-only machine: under torchrun every process then
        # trains its own copy ("process group is initialized, but parallel_mode != DISTRIBUTED").
        use_cpu=not torch.cuda.is_available(),
    )
    values["report_to"] = [] if values["report_to"] == "none" else [values["report_to"]]
    if "tensorboard" in values["report_to"]:  # event files in <run>/logs, beside metrics.jsonl
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(Path(output_dir).parent / "logs")
    values.update(changes)
    return SFTConfig(**values)


class HeldOutAccuracy(SFTTrainer):
    """SFTTrainer that adds the task's metric (the recipe's metric_for_best_model, kit/evaluate/task_metrics.py) by
    greedy generation on the held-out questions to each evaluation (what `load_best_model_at_end` keeps the best
    checkpoint by). Every SFT trainer the kit builds (train.py's, bench.py's) is one, so each trains an adapter in
    fp32 (kit.model.adapter_in_fp32 undoes the bf16 cast SFTTrainer gives a 4-bit base's)."""

    def __init__(self, *args, eval_questions=None, eval_system_prompt: str = "", eval_backend: str = "hf",
                 eval_metric: str = "relaxed_accuracy", eval_max_new_tokens: int = 32, **kwargs):
        super().__init__(*args, **kwargs)
        adapter_in_fp32(self.model)  # before train() builds the optimizer over these parameters
        self.eval_questions, self.eval_system_prompt, self.eval_backend = \
            eval_questions, eval_system_prompt, eval_backend
        self.eval_metric, self.eval_max_new_tokens = eval_metric, eval_max_new_tokens

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                         metric_key_prefix)
        if self.eval_questions is not None:
            output.metrics[f"{metric_key_prefix}_{self.eval_metric}"] = self.task_metric()
            output.metrics[f"{metric_key_prefix}_questions"] = len(self.eval_questions)
        return output

    def task_metric(self) -> float:
        from kit.evaluate.generate import generate_answers, prepare_for_inference

        model, training = self.model, self.model.training
        prepare_for_inference(model, self.eval_backend)
        try:
            answers, _ = generate_answers(model, self.processing_class, self.eval_questions,
                                          self.eval_system_prompt, self.eval_max_new_tokens, EVAL_BATCH_SIZE)
        finally:
            if self.eval_backend == "unsloth":
                from unsloth import FastVisionModel

                FastVisionModel.for_training(model)
            model.train(training)
        verdicts = [task_metrics.verdicts(a, s["answers"], self.eval_metric)
                    for a, s in zip(answers, self.eval_questions)]
        # every answer, so a score can be checked (and compared with eval.py on the same checkpoint)
        folder = Path(self.args.output_dir).parent / "heldout_answers"
        folder.mkdir(exist_ok=True)
        write_heldout(folder / f"step-{self.state.global_step}.jsonl",
                      [{"id": s.get("id"), "answer": a, "references": s["answers"], **v}
                       for s, a, v in zip(self.eval_questions, answers, verdicts)])
        return task_metrics.score(verdicts, self.eval_metric)["value"]


class PlainLossSFTTrainer(HeldOutAccuracy):
    """On the CPU: the model's own loss, since trl's fused LM-head loss is a Triton kernel with no CPU path (the
    number is the same)."""

    compute_loss = Trainer.compute_loss


def trainer_class() -> type[HeldOutAccuracy]:
    return HeldOutAccuracy if torch.cuda.is_available() else PlainLossSFTTrainer


def build_trainer(recipe: dict, precision: str, backend: str, checkpoints: Path, model, processor, collator,
                  train_samples, eval_questions) -> HeldOutAccuracy:
    """TRL's SFTTrainer on the run's data, checkpointing into `checkpoints`, printing nothing of its own (the
    progress line does). Its rotation is off: kit.train.checkpoints.CompleteCheckpoints rotates once a save is whole."""
    args = sft_config(recipe, precision, backend, str(checkpoints), save_total_limit=None)
    train_dataset, eval_dataset, collate = indexed_datasets(train_samples, eval_questions, collator)
    trainer = trainer_class()(model=model, args=args, train_dataset=train_dataset, data_collator=collate,
                              processing_class=processor, eval_dataset=eval_dataset, eval_questions=eval_questions,
                              eval_system_prompt=recipe["system_prompt"], eval_backend=backend,
                              eval_metric=recipe["metric_for_best_model"],
                              eval_max_new_tokens=recipe["max_completion_length"])
    trainer.remove_callback(PrinterCallback)
    return trainer
