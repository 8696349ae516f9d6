"""Recipes are plain dicts. `load(name, overrides)` finds one, applies `key=value` overrides typed by the
default's type, and checks every value, so a mistake ends in one line that names the key and the fix.
`load_config(path, overrides)` does the same for a user's JSON/YAML file (or a run's run_config.json)."""

import difflib
import importlib
import json
import math
from pathlib import Path

import data
from kit.errors import UserError

CHOICES = {
    "method": ("sft", "grpo"),
    "loss_type": ("grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo"),  # TRL's, less those needing other keys
    "scale_rewards": ("group", "batch", "none"),
    "backend": ("auto", "unsloth", "hf"),
    "finetune": ("lora", "full"),
    "precision": ("auto", "bf16", "fp16", "fp32"),
    "synthetic_layout": ("aligned", "chartqa"),
    "report_to": ("none", "tensorboard", "wandb", "trackio"),
    "lr_scheduler_type": ("linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts"),
    # kit/evaluate/task_metrics.METRICS, spelled out here: recipes sit below kit/ and do not import it
    "metric_for_best_model": ("relaxed_accuracy", "exact_match", "anls", "cer", "wer", "rougeL"),
}
# List keys whose every item must be one of these (data/synthetic.py draws exactly these).
LIST_CHOICES = {
    "synthetic_chart_types": ("bar", "line"),
    "synthetic_question_types": ("count", "max", "min", "value", "last"),
}
# The meaningful values of every numeric key in base.py, as intervals ("[" includes the end, "(" leaves it out;
# inf: no bound; "-1 or ..." a special value besides). tests/test_recipes.py checks that no numeric key lacks one.
RANGES = {
    "lora_r": "[1, inf)", "lora_alpha": "(0, inf)",
    "lora_dropout": "[0, 1)",  # a probability of dropping; 1 would drop every input
    "limit": "[0, inf)",  # 0 = every row
    "min_pixels": "[1, inf)", "max_pixels": "[1, inf)",
    "fps": "(0, inf)", "max_frames": "[1, inf)",  # 0 or below sampled nothing, and read as "unset"
    "synthetic_seed": "[0, 4294967295]", "seed": "[0, 4294967295]",  # numpy's seeds are unsigned 32-bit
    "synthetic_num_train": "[1, inf)", "synthetic_num_test": "[1, inf)", "synthetic_size": "[1, inf)",
    "synthetic_grid": "[0, inf)",  # 0 = the model's own
    "per_device_train_batch_size": "[1, inf)", "gradient_accumulation_steps": "[1, inf)",
    "learning_rate": "(0, 1)",  # a rate of 1 or more makes any optimizer here diverge at the first step
    "num_train_epochs": "(0, inf)",
    "max_steps": "-1 or [1, inf)",  # -1 = num_train_epochs decides; 0 trained nothing
    "warmup_steps": "[0, inf)",
    "weight_decay": "[0, 1]",  # decoupled decay shrinks each weight by lr x decay a step: above 1 it flips signs
    "max_grad_norm": "(0, inf)", "logging_steps": "[1, inf)", "save_steps": "[1, inf)",
    "save_total_limit": "[0, inf)",  # 0 keeps all
    "dataloader_num_workers": "[0, inf)", "max_length": "[1, inf)",
    "num_generations": "[1, inf)",  # method=grpo needs 2 or more (check_grpo says why)
    "max_completion_length": "[1, inf)", "beta": "[0, inf)",
    "temperature": "(0, inf)",  # sampling; 0 would be greedy, and every answer of a group the same
    "top_p": "(0, 1]", "num_iterations": "[1, inf)",
    "epsilon": "(0, 1)",  # the clip range of a probability ratio around 1
    "eval_fraction": "[0, 1)", "eval_steps": "[0, inf)", "eval_samples": "[0, inf)",
}


def in_range(value, interval: str) -> bool:
    """Whether the number `value` lies in `interval` as RANGES writes it."""
    special, _, interval = interval.rpartition(" or ")
    if special and value == float(special):
        return True
    low, high = (float(end) for end in interval[1:-1].split(","))
    above = value >= low if interval[0] == "[" else value > low
    below = value <= high if interval[-1] == "]" else value < high
    return math.isfinite(value) and above and below


class RecipeError(UserError, ValueError):
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
    for key, allowed in LIST_CHOICES.items():
        items = recipe.get(key)
        if not isinstance(items, list) or not items:
            raise RecipeError(f"{name}: {key} needs at least one of: {', '.join(allowed)} (comma-separated)")
        for item in items:
            if item not in allowed:
                close = difflib.get_close_matches(str(item), allowed, n=1)
                hint = f" Did you mean {close[0]}?" if close else ""
                raise RecipeError(f"{name}: {key} item {item!r} is not one of: {', '.join(allowed)}.{hint} "
                                  f"e.g. --set {key}={','.join(allowed)}")
    for key, interval in RANGES.items():
        if not in_range(recipe[key], interval):
            from recipes.base import BASE

            raise RecipeError(f"{name}: {key}={recipe[key]} is outside its range {interval}; e.g. "
                              f"--set {key}={BASE[key]}")
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
    check_grpo(recipe, name)
    if not data.known(recipe["dataset"]):
        raise RecipeError(f"{name}: dataset={recipe['dataset']!r} is not one of: {data.choices()}")


def check_grpo(recipe: dict, name: str):
    """The GRPO keys: a run to start from, groups that fit the batch, one weight per reward."""
    if recipe["method"] != "grpo":
        if recipe["init_from"]:
            raise RecipeError(f"{name}: init_from={recipe['init_from']!r} is for method=grpo; set method=grpo or "
                              "init_from=")
        return
    if not recipe["init_from"]:
        raise RecipeError(f"{name}: method=grpo continues a trained run; name it with init_from=RUN_DIR "
                          "(e.g. --set init_from=runs/demo)")
    if recipe["num_generations"] < 2:
        raise RecipeError(f"{name}: num_generations={recipe['num_generations']}: GRPO ranks a group of at least 2 "
                          "answers per question")
    batch = recipe["per_device_train_batch_size"] * recipe["gradient_accumulation_steps"]
    if batch % recipe["num_generations"]:
        raise RecipeError(f"{name}: per_device_train_batch_size x gradient_accumulation_steps = {batch} completions "
                          f"is not a multiple of num_generations={recipe['num_generations']}; every question's "
                          "group must be in one batch")
    weights = recipe["reward_weights"]
    try:
        numbers = [float(weight) for weight in weights]
    except (TypeError, ValueError):
        numbers = []
    if len(numbers) != 2:
        raise RecipeError(f"{name}: reward_weights={weights!r}: give two numbers, for relaxed_accuracy and "
                          "short_answer, e.g. --set reward_weights=1.0,0.2")
    if recipe["eval_steps"] or recipe["load_best_model_at_end"]:
        raise RecipeError(f"{name}: method=grpo does not evaluate during training; set eval_steps=0 and "
                          "load_best_model_at_end=false, and score the run with eval.py")


def notes(recipe: dict) -> list[str]:
    """Settings that are allowed but probably not meant: one line each, printed before training starts."""
    steps, found = recipe["max_steps"], []
    if steps > 0 and recipe["logging_steps"] > steps:
        found.append(f"logging_steps={recipe['logging_steps']} is more than max_steps={steps}: only step 1 and "
                     f"the last step are logged; lower logging_steps for a loss curve")
    if steps > 0 and recipe["warmup_steps"] >= steps:
        found.append(f"warmup_steps={recipe['warmup_steps']} is not below max_steps={steps}: the learning rate "
                     f"never reaches learning_rate={recipe['learning_rate']:g}; lower warmup_steps")
    if steps > 0 and recipe["save_steps"] > steps:
        found.append(f"save_steps={recipe['save_steps']} is more than max_steps={steps}: no checkpoint before the "
                     "end, so an interrupted run starts over")
    return found


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
    recipe, changes = load_values(recipe, overrides)
    check(recipe, f"recipe {name}")
    return recipe, changes


def read_config(path) -> dict:
    """A config file (.json, .yaml or .yml) as a dict; a missing or unreadable file is a RecipeError."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"--config {path}: no such file")
    if path.suffix.lower() not in (".json", ".yaml", ".yml"):
        raise RecipeError(f"--config {path}: give a .json, .yaml or .yml file")
    import yaml

    text = path.read_text(encoding="utf-8")
    try:
        config = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as error:
        raise RecipeError(f"{path}:{error.lineno}: not valid JSON ({error.msg}); fix that line") from None
    except yaml.YAMLError as error:  # its message names the line and column
        raise RecipeError(f"{path}: not valid YAML ({' '.join(str(error).split())})") from None
    if isinstance(config, dict) and isinstance(config.get("recipe"), dict):
        # A run's run_config.json: its resolved recipe is the config; versions, command etc. record the run.
        return {"recipe": config["recipe"], "recipe_name": config.get("recipe_name")}
    if not isinstance(config, dict):
        raise RecipeError(f"{path}: a config is a mapping of recipe keys, e.g. {{\"recipe\": \"demo\", "
                          "\"max_steps\": 100}")
    return config


def load_config(config, overrides: list[str] = (), label: str = "config") -> tuple[dict, list, str]:
    """A config (a file path, or its dict) resolved to a recipe: start from its "recipe" (a recipe name, default
    `base`; or, in a run's run_config.json, the resolved dict, used as it is), set its other keys, then apply
    the `key=value` overrides. Returns the recipe, the (key, old, new) changes and the name the run goes by."""
    from recipes.base import BASE

    if not isinstance(config, dict):
        label, config = str(config), read_config(config)
    start = config.get("recipe", "base")
    if isinstance(start, dict):  # a run's run_config.json: the rest of the file is the run's record
        name, values = config.get("recipe_name") or "config", start
    elif isinstance(start, str):
        name = start
        values = {key: value for key, value in config.items() if key != "recipe"}
    else:
        raise RecipeError(f"{label}: recipe={start!r} is a recipe name, one of: {', '.join(names())}")
    try:
        recipe = dict(BASE) if name == "base" or isinstance(start, dict) else load(name)[0]
    except RecipeError as error:
        raise RecipeError(f"{label}: {error}") from None
    unknown = [key for key in values if key not in BASE]
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(BASE), n=3)
        hint = f" Did you mean: {', '.join(close)}?" if close else " Keys are listed in recipes/base.py."
        raise RecipeError(f"{label}: unknown key {unknown[0]!r}.{hint}")
    changes = []
    for key, value in values.items():
        value = config_value(key, value, BASE[key], label)
        if value != recipe[key]:
            changes.append((key, recipe[key], value))
        recipe[key] = value
    recipe, more = load_values(recipe, overrides)
    check(recipe, label)
    return recipe, changes + more, name


def config_value(key: str, value, default, label: str = "config"):
    """A value from a config file, checked against the type of `default`; text is read as --set reads it
    (YAML reads 2e-4 as text, so learning_rate: 2e-4 works)."""
    if isinstance(value, str) and not isinstance(default, str):
        try:
            return parse_value(key, value, default)
        except RecipeError as error:
            raise RecipeError(f"{label}: {key}={value!r}: {str(error).split(': ', 1)[1]}") from None
    kinds = {bool: (bool,), int: (int,), float: (int, float), list: (list,), str: (str,)}[type(default)]
    if not isinstance(value, kinds) or (isinstance(value, bool) and not isinstance(default, bool)):
        kind = {bool: "true or false", int: "a whole number", float: "a number", list: "a list",
                str: "text"}[type(default)]
        raise RecipeError(f"{label}: {key}={value!r} should be {kind}, like {key}: {default!r}")
    if isinstance(default, list):
        return [str(item) for item in value]
    return float(value) if isinstance(default, float) else value


def load_values(recipe: dict, overrides: list[str]) -> tuple[dict, list]:
    """`recipe` with `key=value` overrides applied as --set applies them (unchecked; see check)."""
    from recipes.base import BASE

    recipe, changes = dict(recipe), []
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
    return recipe, changes
