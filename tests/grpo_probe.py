"""What TRL's GRPOTrainer, built by kit/train/grpo as train.py builds it, makes of a run's questions; tests/test_grpo.py
runs it in a subprocess (kit/train/grpo switches Triton to its interpreter before trl is first imported):

    python tests/grpo_probe.py RUN_DIR OUT.json [recipe overrides, key=value ...]

OUT.json holds, for a few training questions:
  prompts    the token ids GRPO generates from (the trainer's own generate-and-score call), the ids the SFT
             collator puts before the answer's first trained label, and the ids eval.py generates from;
  rewards    each reward function's score, through the trainer's own reward call, of the row's accepted answer
             and of a wrong one (another label, or the count plus one);
  spread     for the first question whose group of 8 answers (one group a batch, sampled at the recipe's
             temperature) differs in reward: the answers, rewards, advantages and the gradient norm of TRL's loss;
  equal      the same for the first question whose 8 answers all score the same (e.g. all wrong).
             beta=0 here: only the reward's part of the loss.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
QUESTIONS = 4  # questions probed for prompts and rewards


def build(run_dir: str, overrides: list[str], checkpoints: Path):
    """(trainer, processor, samples, recipe): train.py's GRPO set-up, on the training split."""
    import recipes
    from kit.train import grpo

    recipe, _ = recipes.load("demo_grpo", [f"init_from={run_dir}", *overrides])
    recipe, _ = grpo.prepare(recipe)
    import data
    from kit import backend as backends
    from kit import families
    from kit import model as models
    from kit.inputs import chat
    from kit.plan import estimate

    base_path = models.resolve(recipe["model_name_or_path"])
    family = families.of_model(base_path)
    model, processor = grpo.load_start(recipe, "hf", backends.torch_dtype("fp32"))
    recipe = estimate.with_model_grid(recipe, family, processor)
    chat.set_pixels(processor, recipe["min_pixels"], recipe["max_pixels"])
    samples = data.load(recipe, recipe["dataset_split"], progress=False)
    trainer = grpo.build_trainer(recipe, "fp32", "hf", checkpoints, model, processor, samples, family)
    trainer.model.train()  # TRL scores a batch as training (its train mode) only when the model is
    # what Trainer's training loop sets before each step's loss, which TRL's loss divides by
    trainer.current_gradient_accumulation_steps = recipe["gradient_accumulation_steps"]
    return trainer, processor, samples, recipe


def group(trainer, row: int) -> list[dict]:
    """One question's rows as TRL's sampler hands them over: the question repeated num_generations times."""
    return [trainer.train_dataset[row]] * trainer.num_generations


def prompts(trainer, processor, samples, recipe) -> list[dict]:
    from kit.inputs.chat import IGNORE, VisionCollator, generation_inputs

    collator = VisionCollator(processor, recipe["max_length"], True, recipe["system_prompt"])
    found = []
    for row in range(QUESTIONS):
        scored = trainer._generate_and_score_completions(group(trainer, row))
        grpo_ids = scored["prompt_ids"][0][scored["prompt_mask"][0].bool()].tolist()
        batch = collator.padded([samples[row]])
        first_trained = (batch["labels"][0] != IGNORE).nonzero()[0].item()
        found.append({"qtype": samples[row]["qtype"], "grpo": grpo_ids,
                      "sft": batch["input_ids"][0][:first_trained].tolist(),
                      "eval": generation_inputs(processor, [samples[row]], recipe["system_prompt"])
                      ["input_ids"][0].tolist()})
    return found


def wrong_answer(sample: dict) -> str:
    right = str(sample["answers"][0])
    if right.isdigit():
        return str(int(right) + 1)  # counts are 2-5: one more is 20 % off or more, beyond the 5 % tolerance
    return "B" if right != "B" else "A"


def rewards(trainer, samples) -> list[dict]:
    found = []
    for row in range(QUESTIONS):
        inputs = [trainer.train_dataset[row]] * 2
        answers = [str(samples[row]["answers"][0]), wrong_answer(samples[row])]
        completions = [[{"role": "assistant", "content": answer}] for answer in answers]
        scored = trainer._calculate_rewards(inputs, [inputs[0]["prompt"]] * 2, completions, [[0], [0]])
        found += [{"qtype": samples[row]["qtype"], "answer": answer, "accepted": inputs[0]["answers"],
                   "rewards": scored[i].tolist()} for i, answer in enumerate(answers)]
    return found


def gradient(trainer, rows, spread: bool) -> dict:
    """The first group among `rows` whose rewards have a spread (`spread`) or are all equal: its rewards,
    advantages and the gradient norm of TRL's loss on it; {} when none is found."""
    import torch

    for row in rows:
        scored = trainer._generate_and_score_completions(group(trainer, row))
        texts = trainer.processing_class.batch_decode(scored["completion_ids"], skip_special_tokens=True)
        weighted = trainer._calculate_rewards(
            [trainer.train_dataset[row]] * trainer.num_generations, [None] * trainer.num_generations,
            [[{"role": "assistant", "content": text}] for text in texts], [[0]] * trainer.num_generations)
        total = (weighted * trainer.reward_weights).sum(dim=1)
        if (len(set(total.tolist())) > 1) == spread:
            trainer.model.zero_grad()
            trainer.compute_loss(trainer.model, scored).backward()
            norm = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in trainer.model.parameters()
                                  if p.grad is not None))
            return {"answers": texts, "rewards": total.tolist(), "advantages": scored["advantages"].tolist(),
                    "grad_norm": norm.item()}
    return {}


def main(run_dir: str, out: str, overrides: list[str]):
    import tempfile

    import torch

    torch.manual_seed(0)
    # the recipe's group size: how many equal rewards TRL averages decides whether their spread is exactly zero
    one_group = ["per_device_train_batch_size=8", "num_generations=8", "beta=0.0", *overrides]
    with tempfile.TemporaryDirectory() as scratch:
        trainer, processor, samples, recipe = build(run_dir, one_group, Path(scratch))
        found = {"prompts": prompts(trainer, processor, samples, recipe), "rewards": rewards(trainer, samples),
                 "spread": gradient(trainer, range(32), spread=True),
                 "equal": gradient(trainer, range(32), spread=False),
                 "image_pad": processor.tokenizer.convert_tokens_to_ids(processor.image_token)}
    Path(out).write_text(json.dumps(found))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
