"""train.py --config: a user's JSON/YAML file as a recipe, checked like --set, replayed by --resume, and a run's
run_config.json replayed as a config."""

import json

import pytest
import yaml

import recipes
from recipes.base import BASE
from tests.conftest import QUICK, ROOT, read_jsonl, train_cli

# The demo recipe written out in full, starting from base: a run that no recipe name can rebuild.
DEMO_FROM_BASE = {key: value for key, value in recipes.load("demo")[0].items() if value != BASE[key]}


def test_the_example_config_resolves_to_demo_with_its_changes():
    recipe, changes, name = recipes.load_config(ROOT / "configs/examples/demo.yaml", ["max_steps=40"])
    demo = recipes.load("demo")[0]
    assert name == "demo"
    assert recipe["max_steps"] == 40  # --set wins over the file
    assert recipe["learning_rate"] == pytest.approx(3e-3) and isinstance(recipe["learning_rate"], float)
    assert recipe["synthetic_num_train"] == 1000 and recipe["model_name_or_path"] == demo["model_name_or_path"]
    assert ("synthetic_num_train", 3000, 1000) in changes


def test_json_and_yaml_give_the_same_recipe(tmp_path):
    config = {"recipe": "demo", "learning_rate": 1e-3, "synthetic_chart_types": ["bar", "line"], "lora_r": 8}
    (tmp_path / "a.json").write_text(json.dumps(config))
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(config))
    assert recipes.load_config(tmp_path / "a.json")[0] == recipes.load_config(tmp_path / "a.yaml")[0]


@pytest.mark.parametrize("text, words", [
    ("recipe: demo\nmax_step: 3\n", ["my.yaml", "max_step", "max_steps"]),
    ("recipe: dem\n", ["my.yaml", "no recipe 'dem'", "demo"]),
    ("learning_rate: fast\n", ["my.yaml", "learning_rate", "number"]),
    ("lora_r: 1.5\n", ["my.yaml", "lora_r", "whole number"]),
    ("load_in_4bit: maybe\n", ["my.yaml", "load_in_4bit", "true or false"]),
    ("max_steps: true\n", ["my.yaml", "max_steps", "whole number"]),
    ("finetune: everything\n", ["my.yaml", "finetune", "lora, full"]),
    ("lora_r: 0\n", ["my.yaml", "lora_r=0", "outside its range"]),
    ("- a list\n", ["my.yaml", "mapping"]),
    ("recipe: demo\n  bad: indent\n", ["my.yaml", "not valid YAML", "line"]),
])
def test_a_bad_config_is_one_line_naming_the_file_and_key(tmp_path, text, words):
    path = tmp_path / "my.yaml"
    path.write_text(text)
    result = train_cli(["--config", str(path), "--plan"])
    assert result.exit_code == 2, result.output
    message = result.output.strip()
    assert "\n" not in message and "Traceback" not in message and message.startswith("error:")
    for word in words:
        assert word in message


def test_recipe_and_config_together_are_refused(tmp_path):
    result = train_cli(["--recipe", "demo", "--config", str(ROOT / "configs/examples/demo.yaml"), "--plan"])
    assert result.exit_code == 2 and "not both" in result.output


@pytest.mark.slow
def test_a_config_from_base_trains_resumes_and_replays(tmp_path):
    config = tmp_path / "mine.yaml"
    config.write_text(yaml.safe_dump({**DEMO_FROM_BASE, "max_steps": 20, "save_steps": 10, "logging_steps": 5,
                                      "warmup_steps": 2, "synthetic_num_train": 240, "synthetic_num_test": 40}))
    run = tmp_path / "run"
    result = train_cli(["--config", str(config), "--output", str(run), "--set", "learning_rate=2e-3"])
    assert result.exit_code == 0, result.output
    saved = json.loads((run / "run_config.json").read_text())
    assert saved["recipe_name"] == "base" and saved["recipe"]["learning_rate"] == pytest.approx(2e-3)
    assert saved["recipe"]["model_name_or_path"] == "tiny" and saved["recipe"]["max_steps"] == 20

    # --resume rebuilds the recipe from the recorded config (recipes.load("base") would fail) and goes on.
    resumed = train_cli(["--resume", str(run), "--set", "max_steps=30"])
    assert resumed.exit_code == 0, resumed.output
    assert "resuming from" in resumed.output and "checkpoint-20" in resumed.output
    steps = [row["step"] for row in read_jsonl(run / "metrics.jsonl")]
    assert steps == sorted(set(steps)) and steps[-3:] == [20, 25, 30]
    after = json.loads((run / "run_config.json").read_text())["recipe"]
    assert after == {**saved["recipe"], "max_steps": 30}

    # The run's record replays as a config: the same recipe, whatever else the file holds.
    replayed, _, name = recipes.load_config(run / "run_config.json")
    assert replayed == after and name == "base"
    plan = train_cli(["--config", str(run / "run_config.json"), "--plan", "--plan-samples", "20"])
    assert plan.exit_code == 0, plan.output
    assert "recipe base:" in plan.output


def test_text_values_are_typed_like_set():
    # YAML reads 3e-3 as text and a JSON user may quote numbers: both are typed as --set types them.
    recipe, _, _ = recipes.load_config({"recipe": "demo", **dict(item.split("=") for item in QUICK),
                                        "learning_rate": "3e-3", "synthetic_chart_types": "bar, line"})
    assert recipe["max_steps"] == 60 and recipe["learning_rate"] == pytest.approx(3e-3)
    assert recipe["synthetic_chart_types"] == ["bar", "line"]
