"""The family matrix: each family's tiny model through every step (train, eval, merge with its parity check, GGUF
with its proof in llama.cpp, infer from the run, the merged folder and the GGUF pair), and what a family decides
(LoRA targets, the plan's shape, llama.cpp names), read back from the files the scripts write."""

import json

import pytest
from click.testing import CliRunner

from kit import families
from tests.conftest import QUICK, train_cli

MATRIX = ["qwen2-vl", "qwen2.5-vl"]
# what llama.cpp calls each family (its converter's arch and clip.projector_type), checked in the GGUF files
LLAMA_NAMES = {"qwen2-vl": ("qwen2vl", "qwen2vl_merger"), "qwen2.5-vl": ("qwen2vl", "qwen2.5vl_merger")}


def cli(script, *args):
    return CliRunner().invoke(script.main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module", params=MATRIX)
def family_run(request, tmp_path_factory):
    """(family name, run folder): the shortened demo on the family's tiny model."""
    folder = tmp_path_factory.mktemp(request.param) / "run"
    args = ["--recipe", "demo", "--output", str(folder), "--set", f"model_name_or_path=tiny:{request.param}"]
    for item in QUICK:
        args += ["--set", item]
    result = train_cli(args)
    assert result.exit_code == 0, result.output
    return request.param, folder


@pytest.fixture(scope="module")
def exported(family_run):
    """merge.py --to merged,gguf at f32 with its proof in llama.cpp."""
    import merge
    from kit.converter import find_converter

    _, run = family_run
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LLAMA_CPP_DIR", str(find_converter().parent))
        result = cli(merge, run, "--to", "merged,gguf", "--quant", "f32", "--out", run.parent / "export")
    assert result.exit_code == 0, result.output
    return run.parent / "export"


def test_train_records_the_family_and_learns(family_run):
    name, run = family_run
    config = json.loads((run / "run_config.json").read_text())
    assert config["family"] == name
    built = json.loads((run / "config.json").read_text())["model_type"]
    assert built in families.by_name(name).model_types  # the tiny model really is that architecture
    assert config["recipe"]["synthetic_grid"] > 0  # read from the model, not left to the data source
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert losses[-1] < losses[0] / 2


def test_eval_scores_the_run(family_run):
    import eval as evaluate

    _, run = family_run
    result = cli(evaluate, run, "--limit", 8, "--compare", "finetuned", "--out", run.parent / "eval")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (run.parent / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and all(isinstance(row["systems"]["finetuned"]["answer"], str) for row in rows)
    report = json.loads((run.parent / "eval" / "report.json").read_text())
    right = sum(row["systems"]["finetuned"]["relaxed"] for row in rows)
    assert report["systems"]["finetuned"]["relaxed"]["right"] == right


def test_merge_parity_and_gguf_proof(family_run, exported):
    from gguf import GGUFReader

    name, _ = family_run
    parity = json.loads((exported / "merged" / "merge_report.json").read_text())
    assert parity["identical_answers"] == parity["num_samples"] > 0
    report = json.loads((exported / "gguf" / "gguf_report.json").read_text())
    assert report["family"] == name
    arch, projector = LLAMA_NAMES[name]
    text = GGUFReader(exported / "gguf" / report["models"]["f32"])
    assert text.fields["general.architecture"].contents() == arch
    mmproj = GGUFReader(exported / "gguf" / report["mmproj"])
    assert mmproj.fields["clip.projector_type"].contents() == projector
    for kind in ("image", "text"):
        proof = report["verification"]["f32"][kind]
        assert proof["prompt_identical"], proof
        assert proof["agree"] and proof["llama_cpp_tokens"] == proof["hf_tokens"], proof


def test_infer_answers_alike_from_run_merged_and_gguf(family_run, exported):
    import infer

    import data

    _, run = family_run

    recipe = json.loads((run / "run_config.json").read_text())["recipe"]
    sample = data.load({**recipe, "limit": 1}, "test", progress=False)[0]
    question = sample["messages"][0]["content"][-1]["text"]
    answers = {}
    for target in (run, exported / "merged", exported / "gguf"):
        result = cli(infer, target, "--image", sample["images"][0], "--question", question)
        assert result.exit_code == 0, result.output
        answers[target.name] = result.stdout.strip().splitlines()[-1].strip()
    # greedy at f32 on the same chat text and image size: the same answer three ways
    assert len(set(answers.values())) == 1, answers


@pytest.mark.parametrize("name", MATRIX)
def test_vision_lora_adapts_the_familys_vision_mlp(name):
    from transformers import AutoModelForImageTextToText

    import recipes
    from kit.model import add_lora, tiny_model_dir

    recipe, _ = recipes.load("demo", ["finetune=lora", "finetune_vision_layers=true", "finetune_language_layers=false",
                                      "finetune_attention_modules=false"])
    model = add_lora(AutoModelForImageTextToText.from_pretrained(tiny_model_dir(name)), recipe, "hf")
    adapted = {n.rsplit(".", 1)[-1] for n, module in model.named_modules() if hasattr(module, "lora_A")}
    assert adapted == set(families.by_name(name).lora.vision_mlp)
    assert not any("language_model" in n for n, module in model.named_modules() if hasattr(module, "lora_A"))
    expected = {"qwen2-vl": {"fc1", "fc2"}, "qwen2.5-vl": {"gate_proj", "up_proj", "down_proj"}}[name]
    assert adapted == expected  # Qwen2.5-VL's vision MLP is SwiGLU: attention-only adapters were the old bug


@pytest.mark.parametrize("recipe, shape", [("chartqa_qwen25vl_7b", "random:qwen2.5-vl-7b"),
                                           ("chartqa_qwen25vl_3b", "random:qwen2.5-vl-3b")])
def test_plan_on_the_true_qwen25vl_shapes_names_its_modules(recipe, shape, tmp_path):
    result = train_cli(["--recipe", recipe, "--plan", "--gpu", "24GB", "--output", str(tmp_path / "run"),
                        "--set", "dataset=synthetic", "--set", "synthetic_num_train=8", "--set", "eval_split=",
                        "--set", f"model_name_or_path={shape}"])
    assert result.exit_code == 0, result.output
    assert "vision (qkv proj gate_proj up_proj down_proj)" in result.output
    assert "merger (mlp.0 mlp.2)" in result.output and "adapters on: language q_proj" in result.output
    assert "fits:" in result.output or "does not fit" in result.output


def test_unknown_model_names_and_types_are_one_line(tmp_path):
    for name, words in (("tiny:qwen9-vl", "tiny:qwen2.5-vl"), ("random:qwen2.5-vl-70b", "random:qwen2.5-vl-7b"),
                        ("not a model", "not a folder")):
        result = train_cli(["--recipe", "demo", "--plan", "--output", str(tmp_path / "run"),
                            "--set", f"model_name_or_path={name}", "--set", "synthetic_num_train=8"])
        assert result.exit_code == 2, result.output
        assert words in result.output and "Traceback" not in result.output
    folder = tmp_path / "llama"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    result = train_cli(["--recipe", "demo", "--plan", "--output", str(tmp_path / "run"),
                        "--set", f"model_name_or_path={folder}", "--set", "synthetic_num_train=8"])
    assert result.exit_code == 2, result.output
    assert "'llama'" in result.output and "qwen2.5-vl (qwen2_5_vl)" in result.output
