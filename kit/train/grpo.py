"""GRPO: continue a trained run (`init_from`) with TRL's GRPOTrainer, rewarded by the rule eval.py reports.

For each question the trainer samples `num_generations` answers and scores each with two rewards:
- `relaxed_accuracy`: 1 when the answer is right against any accepted answer under ChartQA's relaxed rule
  (kit/evaluate/scoring.relaxed_correct, the same call eval.py makes), else 0;
- `short_answer`: 1 when the answer has no extra words (one line, no more words than the longest accepted
  answer), else 0; weighted small by `reward_weights`, it only breaks ties between right answers.
With a thinking family the answer is the text after its think block; a block that never closes answers nothing.

Nothing here is a trainer: the model, the prompts and GRPOConfig are built from the recipe and handed to TRL
(Unsloth patches TRL's GRPOTrainer when it is imported first, on its GPU path). transformers/trl are imported
inside the functions, after the backend is chosen.
"""

import json
from pathlib import Path

from kit.errors import UserError
from kit.evaluate import task_metrics

# What the GRPO run takes from the run it starts from: the weights only make sense on the same model, loaded the
# same way, shown charts at the same size and prompted the same way (eval.py's `finetuned` uses these keys too).
INHERITED = ("model_name_or_path", "finetune", "load_in_4bit", "unsloth_dynamic_4bit", "lora_r", "lora_alpha",
             "lora_dropout", "finetune_vision_layers", "finetune_language_layers", "finetune_attention_modules",
             "finetune_mlp_modules", "system_prompt", "min_pixels", "max_pixels")


# --- rewards (TRL's signature: completions plus the dataset's columns as keyword lists) ------------------------
def answer_of(completion: str, think_end: str | None = None) -> str | None:
    """The answer in a completion: all of it for a family that does not think; for one that does (`think_end`
    is its closing marker) the text after the last think block, or None when the block never closed."""
    if think_end:
        if think_end not in completion:
            return None
        completion = completion.rsplit(think_end, 1)[1]
    return completion.strip()


def completion_text(completion) -> str:
    """TRL hands a conversational completion as [{"role": "assistant", "content": text}]; a plain one as text."""
    if isinstance(completion, list):
        return "".join(part["content"] if isinstance(part["content"], str) else
                       "".join(block.get("text", "") for block in part["content"]) for part in completion)
    return completion


def relaxed_accuracy(completions, answers, think_end=None, metric="relaxed_accuracy", **kwargs) -> list[float]:
    """The task's metric as a reward (kit/evaluate/task_metrics.reward: the recipe's metric_for_best_model, what
    eval.py reports; charts: 1.0 for an answer right under ChartQA's relaxed rule against any accepted answer, else
    0.0)."""
    rewards = []
    for completion, accepted in zip(completions, answers):
        answer = answer_of(completion_text(completion), think_end)
        rewards.append(0.0 if answer is None else task_metrics.reward(metric, answer, accepted))
    return rewards


def short_answer(completions, answers, think_end=None, **kwargs) -> list[float]:
    """1.0 for an answer with no extra words: one non-empty line, no longer in words than the longest accepted
    answer ("The answer is 42." for 42 gets 0); else 0.0."""
    rewards = []
    for completion, accepted in zip(completions, answers):
        answer = answer_of(completion_text(completion), think_end)
        longest = max(len(str(reference).split()) for reference in accepted)
        rewards.append(float(bool(answer) and "\n" not in answer and len(answer.split()) <= longest))
    return rewards


def reward_functions(think_end: str | None = None, metric: str = "relaxed_accuracy") -> list:
    """The two rewards, in the order of the recipe's reward_weights."""
    import functools

    return [functools.partial(relaxed_accuracy, think_end=think_end, metric=metric),
            functools.partial(short_answer, think_end=think_end)]


# --- the recipe: what the run starts from ----------------------------------------------------------------------
def start_run(init_from: str) -> tuple[Path, Path]:
    """(the folder with the start's weights or adapter, its run's run_config.json), checked: `init_from` is a
    finished run folder, or one of its checkpoints (RUN/checkpoints/checkpoint-N, as eval.py takes them)."""
    folder = Path(init_from)
    config = folder / "run_config.json"
    if folder.name.startswith("checkpoint-") and not config.exists():
        config = folder.parent.parent / "run_config.json"
    if not config.exists():
        raise UserError(f"init_from={init_from}: no run_config.json there; name a finished run folder made by "
                        "train.py (or one of its checkpoints/checkpoint-N), e.g. --set init_from=runs/demo")
    if not any((folder / name).exists() for name in ("adapter_config.json", "model.safetensors",
                                                     "model.safetensors.index.json")):
        raise UserError(f"init_from={init_from}: the run has no final weights or adapter yet (still training, or "
                        f"stopped early); finish it with python train.py --resume {init_from}, or name one of its "
                        "checkpoints/checkpoint-N")
    return folder, config


def prepare(recipe: dict) -> tuple[dict, list[tuple[str, object, object]]]:
    """Before anything loads: the recipe with the model keys (INHERITED) of the run it starts from, and the
    (key, old, new) values that changed; on a machine without CUDA, Triton switched to its interpreter (see
    trainer_class). A recipe without method=grpo is returned as it is."""
    if recipe["method"] != "grpo":
        return recipe, []
    saved = json.loads(start_run(recipe["init_from"])[1].read_text())["recipe"]
    changed = [(key, recipe[key], saved[key]) for key in INHERITED if key in saved and saved[key] != recipe[key]]
    use_triton_interpreter_without_cuda()
    return {**recipe, **{key: saved[key] for key in INHERITED if key in saved}}, changed


def use_triton_interpreter_without_cuda():
    """TRL 1.15 computes GRPO's log-probabilities only through its Triton kernel (trl.kernels), and Triton has no
    CPU driver; its interpreter runs the same kernel on CPU tensors (slow, equal to float32 rounding). Triton
    reads the switch as it defines each kernel, its own included, so this runs before it is first imported
    (transformers' model classes import it)."""
    import os
    import sys

    import torch

    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        return
    if "triton" in sys.modules:
        raise RuntimeError("internal: triton was imported before kit.train.grpo could switch it to its CPU "
                           "interpreter; call kit.train.grpo.prepare first, or set TRITON_INTERPRET=1")
    os.environ["TRITON_INTERPRET"] = "1"


def load_start(recipe: dict, backend: str, dtype):
    """(model ready to train, processor): the init_from run's adapter on its base, trainable, or its fully
    fine-tuned weights."""
    from kit.model import load_base, prepare_4bit_for_training, resolve

    folder = start_run(recipe["init_from"])[0]
    if recipe["finetune"] == "full":
        return load_base(str(folder), backend, False, dtype, recipe["gradient_checkpointing"], full_finetuning=True)
    if backend == "unsloth":
        from unsloth import FastVisionModel

        # an adapter folder loads as its base with the adapter attached, ready to train on
        model, processor = load_base(str(folder), backend, recipe["load_in_4bit"], dtype,
                                     recipe["gradient_checkpointing"], dynamic_4bit=recipe["unsloth_dynamic_4bit"])
        FastVisionModel.for_training(model)
        return model, processor
    from peft import PeftModel
    from transformers import AutoProcessor

    model, _ = load_base(resolve(recipe["model_name_or_path"]), backend, recipe["load_in_4bit"], dtype,
                         recipe["gradient_checkpointing"])
    if recipe["load_in_4bit"]:
        prepare_4bit_for_training(model, recipe["gradient_checkpointing"])
    model = PeftModel.from_pretrained(model, str(folder), is_trainable=True)  # default: frozen, for inference
    return model, AutoProcessor.from_pretrained(folder)


# --- what TRL's GRPOTrainer is given ---------------------------------------------------------------------------
class Prompts:
    """Rows of the samples as GRPO prompts: {"prompt": the conversation up to the answer (with the recipe's system
    prompt), "images", "answers", "qtype"}, made when a row is read (a datasets transform), so no chart is
    decoded or copied into Arrow before the trainer asks for it."""

    def __init__(self, samples, processor, system_prompt: str):
        self.samples, self.processor, self.system_prompt = samples, processor, system_prompt

    def __call__(self, batch: dict) -> dict:
        from kit.inputs.chat import load_image, prompt_messages, with_system

        samples = [self.samples[row] for row in batch["row"]]
        return {"prompt": [with_system(prompt_messages(s["messages"]), self.system_prompt) for s in samples],
                "images": [[load_image(image, self.processor) for image in s["images"]] for s in samples],
                "answers": [[str(answer) for answer in s["answers"]] for s in samples],
                "qtype": [s.get("qtype") for s in samples]}


def prompt_dataset(samples, processor, system_prompt: str, question_types=()):
    """A datasets.Dataset of row numbers (what TRL takes) that reads as Prompts; with `question_types`, only the
    rows whose "qtype" is one of them."""
    from datasets import Dataset

    rows = [row for row, sample in enumerate(samples) if not question_types or sample.get("qtype") in question_types]
    if not rows:
        found = sorted({str(sample.get("qtype")) for sample in samples})
        raise UserError(f"grpo_question_types={','.join(question_types)}: no training row has one of these qtypes "
                        f"(the rows have: {', '.join(found)}); name some of those, or set grpo_question_types= "
                        "for all rows")
    return Dataset.from_dict({"row": rows}).with_transform(Prompts(samples, processor, system_prompt))


def grpo_config(recipe: dict, precision: str, backend: str, output_dir: str, suppress_tokens=(),
                chat_template_kwargs: dict | None = None):
    """trl.GRPOConfig from the recipe: the training keys as kit/train/sft.sft_config reads them, then the GRPO keys
    (named after GRPOConfig's fields). `suppress_tokens`: ids never sampled in an answer; `chat_template_kwargs`:
    the family's template flags (thinking off), so prompts are written as in SFT and eval."""
    import torch
    from trl import GRPOConfig

    report_to = [] if recipe["report_to"] == "none" else [recipe["report_to"]]
    return GRPOConfig(
        output_dir=output_dir,
        per_device_train_batch_size=recipe["per_device_train_batch_size"],  # completions, not questions
        gradient_accumulation_steps=recipe["gradient_accumulation_steps"],
        learning_rate=recipe["learning_rate"], num_train_epochs=recipe["num_train_epochs"],
        max_steps=recipe["max_steps"], warmup_steps=recipe["warmup_steps"],
        lr_scheduler_type=recipe["lr_scheduler_type"], optim=recipe["optim"], weight_decay=recipe["weight_decay"],
        max_grad_norm=recipe["max_grad_norm"], logging_steps=recipe["logging_steps"], logging_first_step=True,
        # rotation off: kit.train.checkpoints.CompleteCheckpoints rotates once a save is whole
        save_steps=recipe["save_steps"], save_total_limit=None, seed=recipe["seed"],
        data_seed=recipe["seed"], bf16=precision == "bf16", fp16=precision == "fp16",
        gradient_checkpointing=recipe["gradient_checkpointing"] and backend == "hf",
        gradient_checkpointing_kwargs={"use_reentrant": False},
        disable_tqdm=True, report_to=report_to, use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=recipe["dataloader_num_workers"],
        dataloader_pin_memory=torch.cuda.is_available(),
        num_generations=recipe["num_generations"], max_completion_length=recipe["max_completion_length"],
        beta=recipe["beta"], temperature=recipe["temperature"], top_p=recipe["top_p"],
        num_iterations=recipe["num_iterations"], epsilon=recipe["epsilon"], loss_type=recipe["loss_type"],
        scale_rewards=recipe["scale_rewards"], reward_weights=[float(w) for w in recipe["reward_weights"]],
        generation_kwargs={"suppress_tokens": list(suppress_tokens)} if suppress_tokens else None,
        chat_template_kwargs=chat_template_kwargs or None,
    )


def build_trainer(recipe: dict, precision: str, backend: str, checkpoints: Path, model, processor, samples,
                  family):
    """TRL's GRPOTrainer on the run's questions, checkpointing into `checkpoints`, printing nothing of its own (the
    progress line does). Its rotation is off: kit.train.checkpoints.CompleteCheckpoints rotates once a save is whole.
    A thinking family's answer is read after its think block."""
    from transformers.trainer_callback import PrinterCallback

    from kit.model import adapter_in_fp32

    processor.tokenizer.padding_side = "left"  # prompts end where generation starts
    # A sampled image pad would make the trainer's forward pass find more image tokens than the chart has
    # features (an error); no answer holds one, so vision tokens are never sampled.
    vision_ids = [processor.tokenizer.convert_tokens_to_ids(token) for token in family.markup.vision_tokens]
    think_end = family.markup.think[1] if family.markup.think else None
    args = grpo_config(recipe, precision, backend, str(checkpoints), vision_ids, family.chat_template_kwargs)
    trainer = trainer_class()(model=model, reward_funcs=reward_functions(think_end, recipe["metric_for_best_model"]),
                              args=args,
                              train_dataset=prompt_dataset(samples, processor, recipe["system_prompt"],
                                                           recipe["grpo_question_types"]),
                              processing_class=processor)
    trainer.remove_callback(PrinterCallback)
    adapter_in_fp32(trainer.model)
    return trainer


def trainer_class():
    """TRL's GRPOTrainer (Unsloth's patched one when unsloth was imported first)."""
    import os

    import torch

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("internal: GRPO on the CPU needs Triton's interpreter; call kit.train.grpo.prepare first")
    from trl import GRPOTrainer

    return GRPOTrainer
