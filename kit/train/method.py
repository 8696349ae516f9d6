"""The training method a recipe names (`method`: sft or grpo) behind one interface, so train.py chooses it once:
each method says how its model is loaded, what batches its samples (GRPO's trainer batches its own prompts and
completions: no collator) and which TRL trainer runs it. Checkpoints and progress are the same for both."""

from pathlib import Path


class SFT:
    """Supervised fine-tuning from the recipe's base: TRL's SFTTrainer with the kit's visible collator."""

    def load(self, base_path: str, recipe: dict, backend: str, dtype):
        from kit import model as models

        return models.load_for_training(base_path, recipe, backend, dtype)

    def collator(self, model, processor, recipe: dict):
        from kit.inputs import chat, packing
        from kit.train import progress

        packer = packing.for_model(model, recipe, processor.tokenizer.pad_token_id)  # None unless packing=true
        return progress.CountingCollator(chat.VisionCollator(
            processor, recipe["max_length"], recipe["train_on_responses_only"], recipe["system_prompt"],
            packer=packer))

    def trainer(self, recipe: dict, precision: str, backend: str, checkpoints: Path, model, processor, collator,
                samples, eval_questions, family):
        from kit.train import sft

        return sft.build_trainer(recipe, precision, backend, checkpoints, model, processor, collator, samples,
                                 eval_questions)


class GRPO:
    """GRPO from a trained run (`init_from`): TRL's GRPOTrainer, rewarded by the rule eval.py reports."""

    def load(self, base_path: str, recipe: dict, backend: str, dtype):
        from kit.train import grpo

        return grpo.load_start(recipe, backend, dtype)

    def collator(self, model, processor, recipe: dict):
        return None

    def trainer(self, recipe: dict, precision: str, backend: str, checkpoints: Path, model, processor, collator,
                samples, eval_questions, family):
        from kit.train import grpo

        return grpo.build_trainer(recipe, precision, backend, checkpoints, model, processor, samples, family)


METHODS = {"sft": SFT, "grpo": GRPO}


def for_recipe(recipe: dict) -> SFT | GRPO:
    return METHODS[recipe["method"]]()
