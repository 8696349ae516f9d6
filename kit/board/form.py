"""The board's recipe form: one field per key of recipes/base.py, typed and checked as --set is, so a value the
form accepts is one train.py accepts, and an error is shown next to the field it is about."""

import recipes
from recipes.base import BASE

SECTIONS = {"model_name_or_path": "Model", "lora_r": "LoRA", "dataset": "Data",
            "per_device_train_batch_size": "Training"}  # the key each part of recipes/base.py starts with


def as_text(value) -> str:
    return ", ".join(map(str, value)) if isinstance(value, list) else str(value)


def start_recipe(name: str) -> dict:
    return dict(BASE) if name == "base" else recipes.load(name)[0]


def read_form(start: str, values: list) -> tuple[list[str], dict[str, str]]:
    """The form as --set overrides of `start` (only what differs), and the errors by key ("" for the form)."""
    recipe, overrides, errors = start_recipe(start), [], {}
    for key, value in zip(BASE, values):
        text = as_text(value)
        try:
            typed = recipes.parse_value(key, text, BASE[key])
        except recipes.RecipeError as error:
            errors[key] = str(error).split(": ", 1)[1]
            continue
        if typed != recipe[key]:
            overrides.append(f"{key}={text}")
    if not errors:
        try:
            recipes.load_config({"recipe": start}, overrides, "form")
        except recipes.RecipeError as error:
            message = str(error).removeprefix("form: ")
            key = next((k for k in BASE if message.startswith(k) or message.startswith(f"--set {k}=")), "")
            errors[key] = message
    return overrides, errors
