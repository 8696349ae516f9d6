"""The family matrix: each family's tiny model through every step (train, eval, merge with its parity check, GGUF
with its proof in llama.cpp, infer from the run, the merged folder and the GGUF pair), and what a family decides
(LoRA targets, the plan's shape, llama.cpp names), read back from the files the scripts write."""

import json

import pytest
from click.testing import CliRunner

from kit import families
from tests.conftest import QLORA, QUICK, train_cli

MATRIX = ["qwen2-vl", "qwen2.5-vl", "qwen3-vl", "qwen3-vl-moe", "qwen3.5", "qwen3.5-moe"]
# what llama.cpp calls each family (its converter's arch and clip.projector_type), checked in the GGUF files
LLAMA_NAMES = {"qwen2-vl": ("qwen2vl", "qwen2vl_merger"), "qwen2.5-vl": ("qwen2vl", "qwen2.5vl_merger"),
               "qwen3-vl": ("qwen3vl", "qwen3vl_merger"), "qwen3-vl-moe": ("qwen3vlmoe", "qwen3vl_merger"),
               "qwen3.5": ("qwen35", "qwen3vl_merger"), "qwen3.5-moe": ("qwen35moe", "qwen3vl_merger")}
# The demo's charts are 5 x 5 tokens of its model: 140 px on Qwen2(.5)-VL's 28-pixel grid, 160 px on Qwen3's 32
# (and max_pixels one such chart, so it is never resized off the grid)
GRID_32 = ["synthetic_size=160", "max_pixels=25600"]
FAMILY_SETS = {"qwen3-vl": GRID_32, "qwen3-vl-moe": GRID_32, "qwen3.5": GRID_32, "qwen3.5-moe": GRID_32}


def cli(script, *args):
    return CliRunner().invoke(script.main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module", params=MATRIX)
def family_run(request, tmp_path_factory):
    """(family name, run folder): the shortened demo on the family's tiny model."""
    folder = tmp_path_factory.mktemp(request.param) / "run"
    args = ["--recipe", "demo", "--output", str(folder), "--set", f"model_name_or_path=tiny:{request.param}"]
    for item in [*QUICK, *FAMILY_SETS.get(request.param, [])]:
        args += ["--set", item]
    result = train_cli(args)
    assert result.exit_code == 0, result.output
    return request.param, folder


@pytest.fixture(scope="module")
def exported(family_run):
    """merge.py --to merged,gguf at f32 with its proof in llama.cpp."""
    import merge
    from kit.export.converter import find_converter

    _, run = family_run
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LLAMA_CPP_DIR", str(find_converter().parent))
        result = cli(merge, run, "--to", "merged,gguf", "--quant", "f32", "--out", run.parent / "export")
    assert result.exit_code == 0, result.output
    return run.parent / "export"


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_infer_answers_alike_from_run_merged_and_gguf(family_run, exported):
    import data
    import infer

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


# QLoRA on every family, kept short: the run need not learn much, only go through every step on a 4-bit base
QLORA_SHORT = ["synthetic_num_train=64", "synthetic_num_test=40", "max_steps=12", "logging_steps=4", "save_steps=12",
               "warmup_steps=2"]


@pytest.fixture(scope="module", params=MATRIX)
def qlora_export(request, tmp_path_factory):
    """(family name, run folder, export folder): a short QLoRA run on the family's tiny model, merged from the
    16-bit base and exported to GGUF f32 and q4_k_m with the proof in llama.cpp."""
    import merge
    from kit.export.converter import find_converter

    folder = tmp_path_factory.mktemp(f"qlora-{request.param}") / "run"
    args = ["--recipe", "demo", "--output", str(folder), "--set", f"model_name_or_path=tiny:{request.param}"]
    for item in [*QLORA, *QLORA_SHORT, *FAMILY_SETS.get(request.param, [])]:
        args += ["--set", item]
    result = train_cli(args)
    assert result.exit_code == 0, result.output
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LLAMA_CPP_DIR", str(find_converter().parent))
        result = cli(merge, folder, "--to", "merged,gguf", "--quant", "f32,q4_k_m", "--out", folder.parent / "export")
    assert result.exit_code == 0, result.output
    return request.param, folder, folder.parent / "export"


@pytest.mark.slow
def test_qlora_trains_merges_from_the_16bit_base_and_passes_the_llama_cpp_proof(qlora_export):
    name, run, export = qlora_export
    recipe = json.loads((run / "run_config.json").read_text())["recipe"]
    assert recipe["load_in_4bit"] and (run / "adapter_model.safetensors").exists()
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert losses[-1] < losses[0]
    exported = json.loads((run / "export.json").read_text())
    assert exported["four_bit"]
    parity = exported["parity"]  # the adapter on the 16-bit base against the merged model: the same model in fp32
    assert parity["identical_answers"] == parity["num_samples"] > 0 and parity["max_abs_logit_diff"] < 1e-4
    as_trained = exported["as_trained"]  # the NF4 base + adapter that trained: another model, measured
    assert as_trained["num_samples"] == 16 and 0 <= as_trained["identical_answers"] <= 16
    assert as_trained["max_abs_logit_diff"] > 1e-3
    report = json.loads((export / "gguf" / "gguf_report.json").read_text())
    assert report["family"] == name and list(report["models"]) == ["f32", "q4_k_m"]
    for kind in ("image", "text"):
        proof = report["verification"]["f32"][kind]
        assert proof["prompt_identical"] and proof["agree"], proof


@pytest.mark.slow
def test_eval_compares_the_run_as_trained_with_what_was_exported(qlora_export):
    """eval.py --compare finetuned,merged,gguf: the run on its 4-bit base, the merged folder and every GGUF file,
    on the same questions, each paired against the run as trained."""
    import eval as evaluate

    _, run, export = qlora_export
    out = run.parent / "eval-deployed"
    result = cli(evaluate, run, "--limit", 6, "--compare", "finetuned,merged,gguf", "--out", out)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "report.json").read_text())
    systems = ["finetuned", "merged", "gguf:f32", "gguf:q4_k_m"]
    assert list(summary["systems"]) == systems and all(s["samples"] == 6 for s in summary["systems"].values())
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    against = {pair["candidate"]: pair for pair in summary["pairs"] if pair["baseline"] == "finetuned"}
    for system in systems[1:]:
        changed = [row["systems"][system]["relaxed"] != row["systems"]["finetuned"]["relaxed"] for row in rows]
        assert against[system]["fixed"] + against[system]["broken"] == sum(changed)
    # the f32 GGUF is the merged model in llama.cpp: the same greedy answers as the merged folder
    answers = {system: [row["systems"][system]["answer"] for row in rows] for system in ("gguf:f32", "merged")}
    assert answers["gguf:f32"] == answers["merged"]


@pytest.mark.parametrize("name", MATRIX)
def test_every_family_generates_on_a_4bit_base_with_its_small_layers_kept_16bit(name):
    """bitsandbytes' CPU kernels take Linears whose outputs come in blocks of 32: the family names the narrower ones
    (Qwen3.5's per-head in_proj_a / in_proj_b, the MoE's one-output shared_expert_gate), which stay 16-bit; every
    other Linear but the output head is NF4."""
    import torch
    from bitsandbytes.nn import Linear4bit

    from data.synthetic import generate
    from kit.inputs import chat
    from kit.model import load_base, tiny_model_dir

    model, processor = load_base(str(tiny_model_dir(name)), "hf", True, torch.float32, gradient_checkpointing=False)
    kept = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m) is torch.nn.Linear}
    assert kept == {"lm_head", *families.by_name(name).keep_16bit}
    assert sum(isinstance(m, Linear4bit) for m in model.modules()) > 10
    grid = families.by_name(name).grid(processor)
    sample = generate("test", 1, seed=1, size=5 * grid, grid=grid, cache=None, progress=False)[0]
    inputs = chat.generation_inputs(processor, [sample], "")
    with torch.no_grad():
        output = model.eval().generate(**inputs, max_new_tokens=3, do_sample=False)
    assert output.shape[1] == inputs["input_ids"].shape[1] + 3


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
    expected = {"qwen2-vl": {"fc1", "fc2"}, "qwen2.5-vl": {"gate_proj", "up_proj", "down_proj"}}.get(
        name, {"linear_fc1", "linear_fc2"})  # Qwen3-VL's and Qwen3.5's towers
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


@pytest.mark.parametrize("recipe, shape, modules", [
    ("chartqa_qwen3vl_8b", "random:qwen3-vl-8b", "deepstack_merger_list.linear_fc1"),
    ("chartqa_qwen3vl_4b", "random:qwen3-vl-4b", "deepstack_merger_list.linear_fc1"),
    ("chartqa_qwen35_9b", "random:qwen3.5-9b", "in_proj_qkv in_proj_z in_proj_b in_proj_a out_proj"),
    ("chartqa_qwen35_4b", "random:qwen3.5-4b", "in_proj_qkv in_proj_z in_proj_b in_proj_a out_proj")])
def test_qwen3_recipes_fit_24gb_on_their_true_shapes(recipe, shape, modules, tmp_path):
    result = train_cli(["--recipe", recipe, "--plan", "--gpu", "24GB", "--output", str(tmp_path / "run"),
                        "--set", "dataset=synthetic", "--set", "synthetic_num_train=8", "--set", "eval_split=",
                        "--set", f"model_name_or_path={shape}"])
    assert result.exit_code == 0, result.output
    assert modules in result.output  # the plan counts DeepStack mergers / DeltaNet projections by their names
    assert "fits:" in result.output, result.output
    assert ("16-bit" in result.output) == ("qwen35" in recipe)  # Qwen3.5 trains 16-bit LoRA, Qwen3-VL QLoRA


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen3-vl", "qwen3.5"])
def test_a_think_block_is_in_the_loss_only_when_the_answer_has_one(name):
    """Qwen3.5's template writes an empty think block before every answer (and its thinking-off prompt ends with
    one): prompt, not answer. A row whose answer thinks keeps its block in the loss."""
    from transformers import AutoProcessor

    from data.synthetic import generate
    from kit.inputs import chat
    from kit.model import tiny_model_dir

    processor = AutoProcessor.from_pretrained(tiny_model_dir(name))
    plain = generate("train", 1, seed=1, size=160, grid=32, cache=None, progress=False)[0]
    answer = plain["answers"][0]
    thinking = {**plain, "messages": [plain["messages"][0], {"role": "assistant", "content": [
        {"type": "text", "text": f"<think>\nI count the bars.\n</think>\n\n{answer}"}]}]}
    batch = chat.VisionCollator(processor, 512)([plain, thinking])
    learned = [processor.tokenizer.decode(batch["input_ids"][row][batch["labels"][row] != -100]) for row in (0, 1)]
    assert learned[0] == f"{answer}<|im_end|>"
    assert learned[1] == f"<think>\nI count the bars.\n</think>\n\n{answer}<|im_end|>"
    prompt = processor.tokenizer.decode(chat.generation_inputs(processor, [plain])["input_ids"][0])
    assert prompt.endswith("<|im_start|>assistant\n" + families.by_name(name).markup.empty_think * (name == "qwen3.5"))


def test_eval_scores_after_a_think_block_and_counts_it():
    from kit.evaluate import predictions, report

    samples = [{"id": str(i), "images": [], "answers": ["4"],
                "messages": [{"role": "user", "content": [{"type": "text", "text": "How many bars?"}]}]}
               for i in range(3)]
    answers = {"finetuned": ["<think>\nfour bars\n</think>\n\n4", "4", "three</think>\n\n3"]}
    rows = predictions.model_rows(samples, None, answers, "relaxed_accuracy")
    scored = [row["systems"]["finetuned"] for row in rows]
    assert [s["answer"] for s in scored] == ["4", "4", "3"] and [s["relaxed"] for s in scored] == [True, True, False]
    assert [s.get("think") for s in scored] == ["four bars", None, "three"]
    summary = report.summarize(rows, ["finetuned"], "relaxed_accuracy")
    assert summary["systems"]["finetuned"]["think_blocks"] == 2


def test_eval_score_rescores_after_a_think_block(tmp_path):
    """eval.py --score on another tool's predictions takes a think block off as eval.py does its own."""
    from kit.evaluate import predictions, report

    lines = [{"id": "1", "prediction": "<think>\nfour bars\n</think>\n\n4", "answer": "4"},
             {"id": "2", "prediction": "5", "answer": "4"}]
    (tmp_path / "tool.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    rows, names = predictions.read_predictions([tmp_path / "tool.jsonl"], "relaxed_accuracy")
    assert [row["systems"]["tool"]["relaxed"] for row in rows] == [True, False]
    assert report.summarize(rows, names, "relaxed_accuracy")["systems"]["tool"]["think_blocks"] == 1


@pytest.mark.parametrize("name", ["qwen3-vl-moe", "qwen3.5-moe"])
def test_lora_on_experts_is_a_named_switch_off_by_default(name):
    from transformers import AutoModelForImageTextToText

    import recipes
    from kit.model import add_lora, tiny_model_dir
    from kit.plan.estimate import lora_parameters, model_shape

    path = tiny_model_dir(name)
    counted = {}
    for experts in (False, True):
        recipe, _ = recipes.load("demo", ["finetune=lora", f"finetune_experts={str(experts).lower()}"])
        model = add_lora(AutoModelForImageTextToText.from_pretrained(path), recipe, "hf")
        on_experts = [n for n, m in model.named_modules() if hasattr(m, "lora_A") and ".experts" in n]
        assert bool(on_experts) == experts
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert lora_parameters(model_shape(str(path)), recipe) == trained  # the plan counts what peft adds
        counted[experts] = trained
    assert counted[True] > counted[False]


def test_finetune_experts_on_a_dense_model_is_one_line():
    from transformers import AutoModelForImageTextToText

    import recipes
    from kit.errors import UserError
    from kit.model import add_lora, tiny_model_dir

    recipe, _ = recipes.load("demo", ["finetune=lora", "finetune_experts=true"])
    with pytest.raises(UserError, match="no routed experts"):
        add_lora(AutoModelForImageTextToText.from_pretrained(tiny_model_dir("qwen3-vl")), recipe, "hf")


@pytest.mark.slow
@pytest.mark.parametrize("family_run", ["qwen3.5"], indirect=True)
def test_hybrid_model_answers_alike_with_and_without_a_reused_context(family_run, exported):
    """llama-cpp-python reuses a cached prefix by removing the rest of the KV cache, which a recurrent (Gated
    DeltaNet) memory refuses: the kit's llama.cpp answers for Qwen3.5 must not depend on what was asked before."""
    import data
    from kit.export import llama

    _, run = family_run
    recipe = json.loads((run / "run_config.json").read_text())["recipe"]
    samples = list(data.load({**recipe, "limit": 3}, "test", progress=False))[:3]
    pair = llama.find_pair(exported / "gguf")
    together = llama.gguf_answers(exported / "gguf", recipe, samples, "", 8)[0]  # one context, three chats
    alone = []
    for sample in samples:  # a fresh context for each
        llm = llama.open_pair(*pair, recipe)
        try:
            alone += llama.answers(llm, [sample], "", 8)[0]
        finally:
            llm.close()
    assert together == alone
