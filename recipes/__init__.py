"""Recipes are plain dicts. `load(name, overrides)` finds one, applies `key=value` overrides typed by the
default's type, and checks every value, so a mistake ends in one line that names the key and the fix."""

import difflib
import importlib
from pathlib import Path

CHOICES = {
    "backend": ("auto", "unsloth", "hf"),
    "finetune": ("lora", "full"),
    "precision": ("auto", "bf16", "fp16", "fp32"),
    "synthetic_layout": ("aligned", "chartqa"),
    "report_to": ("none", "tensorboard", "wandb", "trackio"),
    "lr_scheduler_type": ("linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts"),
}
POSITIVE = ("lora_r", "lora_alpha", "learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps",
            "num_train_epochs", "logging_steps", "save_steps", "max_length", "min_pixels", "max_pixels",
            "synthetic_num_train", "synthetic_num_test", "synthetic_size", "max_grad_norm")
NON_NEGATIVE = ("lora_dropout", "limit", "warmup_steps", "weight_decay", "save_total_limit", "dataloader_num_workers",
                "eval_steps", "eval_samples", "eval_fraction")


class RecipeError(ValueError):
    """A mistake in a recipe or an override; the message says which key and what to do."""


def names() -> list[str]:
    return sorted(p.stem for p in Path(__file__).parent.glob("*.py") if p.stem not in ("__init__", "base"))


def parse_value(key: str, text: str, default):
    """`text` as the type of `default`: bool, int, float, list (comma-separated) or str."""
    if isinstance(default, bool):
        lowered = text.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise RecipeError(f"--set {key}={text}: {key} is true or false")
    if isinstance(default, int):
        try:
            return int(text)
        except ValueError:
            raise RecipeError(f"--set {key}={text}: {key} is a whole number, e.g. {key}={default}") from None
    if isinstance(default, float):
        try:
            return float(text)
        except ValueError:
            raise RecipeError(f"--set {key}={text}: {key} is a number, e.g. {key}={default:g}") from None
    if isinstance(default, list):
        return [item.strip() for item in text.split(",") if item.strip()]
    return text


def check(recipe: dict, name: str = "recipe"):
    for key, allowed in CHOICES.items():
        if recipe.get(key) not in allowed:
            raise RecipeError(f"{name}: {key}={recipe.get(key)!r} is not one of: {', '.join(allowed)}")
    for key in POSITIVE:
        if not recipe[key] > 0:
            raise RecipeError(f"{name}: {key} must be greater than 0, not {recipe[key]}")
    for key in NON_NEGATIVE:
        if recipe[key] < 0:
            raise RecipeError(f"{name}: {key} must be 0 or more, not {recipe[key]}")
    if recipe["eval_split"] and recipe["eval_fraction"]:
        raise RecipeError(f"{name}: set eval_split or eval_fraction, not both")
    if recipe["eval_fraction"] >= 1:
        raise RecipeError(f"{name}: eval_fraction is a share of the training rows, below 1 (e.g. 0.05)")
    if recipe["load_best_model_at_end"] and recipe["eval_steps"] and recipe["save_steps"] % recipe["eval_steps"]:
        raise RecipeError(f"{name}: load_best_model_at_end needs save_steps ({recipe['save_steps']}) to be a "
                          f"multiple of eval_steps ({recipe['eval_steps']})")
    if recipe["min_pixels"] > recipe["max_pixels"]:
        raise RecipeError(f"{name}: min_pixels ({recipe['min_pixels']}) is larger than max_pixels "
                          f"({recipe['max_pixels']})")
    if recipe["finetune"] == "full" and recipe["load_in_4bit"]:
        raise RecipeError(f"{name}: finetune=full cannot train 4-bit weights; set load_in_4bit=false or "
                          "finetune=lora")
    if not (recipe["dataset"] in ("chartqa", "latex_ocr", "synthetic")
            or recipe["dataset"].startswith(("jsonl:", "hf:"))):
        raise RecipeError(f"{name}: dataset={recipe['dataset']!r} is not one of: chartqa, latex_ocr, synthetic, "
                          "jsonl:PATH, hf:HUB_ID_OR_FOLDER")


def load(name: str, overrides: list[str] = ()) -> tuple[dict, list[tuple[str, object, object]]]:
    """The recipe `name` with `key=value` overrides applied; returns it and the (key, old, new) changes."""
    from recipes.base import BASE

    if name not in names():
        close = difflib.get_close_matches(name, names(), n=3)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise RecipeError(f"no recipe {name!r}.{hint} Recipes: {', '.join(names())}")
    recipe = dict(importlib.import_module(f"recipes.{name}").RECIPE)
    unknown = set(recipe) - set(BASE)
    if unknown:
        raise RecipeError(f"recipes/{name}.py: unknown keys {sorted(unknown)}; every key must be in recipes/base.py")
    changes = []
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"--set {item}: write key=value, e.g. --set learning_rate=1e-4")
        key, text = item.split("=", 1)
        key = key.strip()
        if key not in BASE:
            close = difflib.get_close_matches(key, list(BASE), n=3)
            hint = f" Did you mean: {', '.join(close)}?" if close else " Keys are listed in recipes/base.py."
            raise RecipeError(f"--set {item}: unknown key {key!r}.{hint}")
        value = parse_value(key, text, BASE[key])
        changes.append((key, recipe[key], value))
        recipe[key] = value
    check(recipe, f"recipe {name}")
    return recipe, changes
