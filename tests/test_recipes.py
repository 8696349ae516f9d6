import pytest

import recipes
from recipes import RecipeError
from recipes.base import BASE
from tests.conftest import train_cli


@pytest.mark.parametrize("name", recipes.names())
def test_every_recipe_loads_and_only_uses_base_keys(name):
    recipe, changes = recipes.load(name)
    assert set(recipe) == set(BASE)
    assert changes == []
    for key, value in recipe.items():  # a recipe may change values, never their types
        assert isinstance(value, type(BASE[key])), f"{name}: {key}={value!r} is not a {type(BASE[key]).__name__}"


def test_expected_recipes_exist():
    assert {"base"} - set(recipes.names()) == {"base"}  # base holds defaults, it is not a recipe
    assert {"demo", "chartqa", "chartqa_2b", "kaggle_t4", "latex_ocr"} <= set(recipes.names())


def test_overrides_are_typed_by_the_default():
    recipe, changes = recipes.load("demo", ["learning_rate=1e-4", "max_steps=7", "load_in_4bit=false",
                                            "synthetic_chart_types=bar, line", "system_prompt=Be brief."])
    assert recipe["learning_rate"] == pytest.approx(1e-4)
    assert recipe["max_steps"] == 7 and isinstance(recipe["max_steps"], int)
    assert recipe["load_in_4bit"] is False
    assert recipe["synthetic_chart_types"] == ["bar", "line"]
    assert recipe["system_prompt"] == "Be brief."
    assert [key for key, _, _ in changes] == ["learning_rate", "max_steps", "load_in_4bit",
                                              "synthetic_chart_types", "system_prompt"]
    assert changes[1][1] == recipes.load("demo")[0]["max_steps"]  # the old value is reported


def test_system_prompt_may_contain_equals_sign():
    recipe, _ = recipes.load("demo", ["system_prompt=a=b"])
    assert recipe["system_prompt"] == "a=b"


@pytest.mark.parametrize("override, words", [
    ("learning_rat=1e-4", ["learning_rat", "Did you mean", "learning_rate"]),
    ("max_steps=ten", ["max_steps", "whole number"]),
    ("learning_rate=fast", ["learning_rate", "number"]),
    ("load_in_4bit=maybe", ["load_in_4bit", "true or false"]),
    ("learning_rate=0", ["learning_rate=0", "outside its range (0, 1)"]),
    ("lora_r=-8", ["lora_r=-8", "outside its range [1, inf)"]),
    ("backend=tpu", ["backend", "auto, unsloth, hf"]),
    ("max_steps", ["key=value"]),
    ("dataset=imagenet", ["dataset", "jsonl:PATH"]),
])
def test_bad_overrides_name_the_key(override, words):
    with pytest.raises(RecipeError) as error:
        recipes.load("chartqa", [override])
    for word in words:
        assert word in str(error.value)


def test_unknown_recipe_suggests_close_names():
    with pytest.raises(RecipeError, match="chartqa"):
        recipes.load("chartqa2b")


def test_full_finetune_of_4bit_weights_is_refused():
    with pytest.raises(RecipeError, match="finetune=full"):
        recipes.load("demo", ["load_in_4bit=true"])


def test_every_numeric_key_has_a_range_its_default_is_in():
    from recipes.base import BASE

    numeric = {k for k, v in BASE.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert numeric == set(recipes.RANGES), numeric ^ set(recipes.RANGES)
    for key in numeric:
        assert recipes.in_range(BASE[key], recipes.RANGES[key]), key


@pytest.mark.parametrize("override", ["fps=0", "fps=-2", "max_frames=0", "max_frames=-1", "max_steps=0",
                                      "max_steps=-3", "lora_dropout=1", "eval_fraction=1", "top_p=0", "top_p=1.5",
                                      "temperature=0", "learning_rate=nan", "learning_rate=inf", "seed=-1",
                                      "weight_decay=2", "epsilon=0", "warmup_steps=-1", "num_train_epochs=0"])
def test_values_without_meaning_are_refused_in_one_line(override):
    key, value = override.split("=")
    result = train_cli(["--recipe", "demo", "--plan", "--set", override])
    assert result.exit_code == 2, result.output
    message = result.output.strip()
    assert "\n" not in message and message.startswith("error:") and key in message, message
    assert f"outside its range {recipes.RANGES[key]}" in message


@pytest.mark.parametrize("override", ["max_steps=-1", "fps=0.5", "max_frames=1", "top_p=1", "lora_dropout=0",
                                      "eval_fraction=0", "seed=0", "weight_decay=0"])
def test_the_ends_of_a_range_load(override):
    recipes.load("demo", [override])
