"""Packing (kit/inputs/packing.py): the same loss and gradients as padding, no attention across samples, steps and
epochs counted in samples, and held-out evaluation and generation on padded batches."""

import copy
import math

import pytest
import torch
from PIL import Image

from kit import families
from tests.conftest import read_jsonl, train_cli

# every family the kit has whose samples stay apart in a packed row; the others refuse packing (below)
MODELS = [f"tiny:{name}" for name in families.names() if families.by_name(name).packs]
UNPACKABLE = [f"tiny:{name}" for name in families.names() if not families.by_name(name).packs]


def sample(width: int, height: int, question: str, answer: str) -> dict:
    color = (width % 251, height % 251, 90)
    return {"images": [Image.new("RGB", (width, height), color)],
            "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
                         {"role": "assistant", "content": [{"type": "text", "text": answer}]}]}


# different image sizes (4, 15 and 24 image tokens) and text lengths, so padding would be uneven
SAMPLES = [sample(56, 56, "How many bars are in the chart?", "3"),
           sample(140, 84, "Which label has the highest value?", "B"),
           sample(112, 168, "What is the value of C?", "the value is 42"),
           sample(56, 56, "How many bars are in the chart?", "4")]


def load(name: str):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from kit import model as models
    from kit.inputs import chat

    path = models.resolve(name)
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    model.train()  # as the trainer runs it (the tiny model has no dropout, so outputs are deterministic)
    processor = AutoProcessor.from_pretrained(path)
    chat.set_pixels(processor, 3136, 313600)
    return model, processor


def collators(model, processor, max_length: int):
    from kit.inputs import chat, packing

    packer = packing.for_model(model, {"packing": True, "max_length": max_length}, processor.tokenizer.pad_token_id)
    return chat.VisionCollator(processor, 512), chat.VisionCollator(processor, 512, packer=packer)


def loss_and_grads(model, batch):
    model.zero_grad()
    output = model(**batch)
    output.loss.backward()
    return output.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def capacity_for(rows: int, lengths: list[int]) -> int:
    """A max_length that packs `lengths` into `rows` rows (first-fit longest first), or, for 0, one that leaves a
    row each, which computes no fewer positions than padding, so the batch stays padded. From the lengths the
    family's processor gives (41, 51, 66, 41 on the 28-pixel grid; 27, 34, 48, 27 on Qwen3's 32)."""
    if rows == 1:
        return sum(lengths)
    if rows == 2:  # the longest with the shortest, the rest in a second row
        return max(lengths) + min(lengths)
    return max(lengths) + 1  # no two fit together: 2 x the shortest is more than the longest


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("rows", [1, 2, 0])
def test_packed_loss_and_gradients_equal_padded(name, rows):
    from kit.inputs.packing import pack_rows

    model, processor = load(name)
    lengths = collators(model, processor, 512)[0](SAMPLES)["attention_mask"].sum(dim=1).tolist()
    assert 2 * min(lengths) > max(lengths) + 1, lengths  # what capacity_for(0, ...) relies on
    max_length = capacity_for(rows, lengths)
    padded_collator, packed_collator = collators(model, processor, max_length)
    padded, packed = padded_collator(SAMPLES), packed_collator(SAMPLES)
    assert len(pack_rows(lengths, max_length)) == (rows or len(SAMPLES)), lengths
    if rows:
        assert "attention_mask" not in packed and packed["position_ids"].shape[:2] == (4, rows)
        assert packed["input_ids"].numel() < padded["input_ids"].numel()
        assert (packed["labels"] != -100).sum() == (padded["labels"][:, 1:] != -100).sum()
    else:
        assert packed.keys() == padded.keys() and torch.equal(packed["input_ids"], padded["input_ids"])
    # the loss is a mean over the same answer tokens, so equal means equal sums
    padded_loss, padded_grads = loss_and_grads(model, padded)
    packed_loss, packed_grads = loss_and_grads(model, packed)
    assert torch.allclose(packed_loss, padded_loss, rtol=1e-5, atol=1e-6), (packed_loss, padded_loss)
    assert padded_grads.keys() == packed_grads.keys() and any("visual" in n for n in padded_grads)
    for name_, grad in padded_grads.items():
        assert torch.allclose(packed_grads[name_], grad, rtol=1e-4, atol=1e-6), name_


@pytest.mark.parametrize("name", MODELS)
def test_changing_one_sample_leaves_the_others_in_its_row_unchanged(name):
    model, processor = load(name)
    padded_collator, packed_collator = collators(model, processor, 512)
    changed = copy.deepcopy(SAMPLES)
    changed[1] = sample(84, 84, "Something else entirely, and longer?", "another answer")
    before, after = packed_collator(SAMPLES), packed_collator(changed)
    assert before["input_ids"].shape[0] == after["input_ids"].shape[0] == 1  # one row holds them all
    old = padded_collator(SAMPLES)["attention_mask"].sum(dim=1).tolist()
    new = padded_collator(changed)["attention_mask"].sum(dim=1).tolist()
    with torch.no_grad():
        logits_before, logits_after = model(**before).logits[0], model(**after).logits[0]
        # the control: the same row without the text positions that mark where each sample starts
        unmarked = model(**{**after, "position_ids": after["position_ids"][1:]}).logits[0]
    # the first sample, and the two after the changed one
    first, last_before, last_after = slice(0, old[0]), slice(old[0] + old[1], None), slice(new[0] + new[1], None)
    assert torch.allclose(logits_after[first], logits_before[first], atol=1e-5)
    assert torch.allclose(logits_after[last_after], logits_before[last_before], atol=1e-5)
    common = min(old[1], new[1])  # the changed sample itself did change
    assert not torch.allclose(logits_after[old[0]:old[0] + common], logits_before[old[0]:old[0] + common])
    # without the boundaries the later samples attend to the changed second one: the check above can fail
    assert not torch.allclose(unmarked[last_after], logits_before[last_before], atol=1e-3)


@pytest.fixture
def spy(monkeypatch):
    """Every forward of the trained model (training flag, attention mask given, position rows) and every packed
    micro-batch's sample count, from a train.py run in this process."""
    from kit import model as models
    from kit.inputs import packing

    calls, packed = [], []
    load_for_training, pack = models.load_for_training, packing.Packer.__call__

    def loading(*args, **kwargs):
        model, processor = load_for_training(*args, **kwargs)

        def record(module, args, kwargs):
            positions = kwargs.get("position_ids")
            calls.append((module.training, kwargs.get("attention_mask") is not None,
                          None if positions is None else positions.shape[0]))

        model.register_forward_pre_hook(record, with_kwargs=True)
        return model, processor

    def packing_call(self, batch):
        packed.append(batch["input_ids"].shape[0])
        return pack(self, batch)

    monkeypatch.setattr(models, "load_for_training", loading)
    monkeypatch.setattr(packing.Packer, "__call__", packing_call)
    return calls, packed


# questions and answers of different lengths, and rows long enough for a micro-batch: samples that pack
VARIED = ["synthetic_question_types=count,max,value", "max_length=1024"]


def demo_charts(name: str) -> list[str]:
    """The demo's charts on the model's own grid: 5 x 5 tokens (140 px on the 28-pixel grid, 160 on Qwen3's 32),
    never resized."""
    from transformers import AutoProcessor

    from kit import model as models

    processor = AutoProcessor.from_pretrained(models.resolve(name))
    side = 5 * families.of_processor(processor).grid(processor)
    return [f"synthetic_size={side}", f"max_pixels={side * side}"]


def run(folder, overrides):
    args = ["--recipe", "demo", "--output", str(folder)]
    for item in overrides:
        args += ["--set", item]
    result = train_cli(args)
    assert result.exit_code == 0, result.output
    return read_jsonl(folder / "metrics.jsonl")


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_steps_and_epochs_are_counted_in_samples(tmp_path, spy, name):
    calls, packed = spy
    rows, batch, accumulation = 36, 4, 2
    common = [f"model_name_or_path={name}", f"synthetic_num_train={rows}", "synthetic_num_test=8", "max_steps=-1",
              "num_train_epochs=1", f"per_device_train_batch_size={batch}",
              f"gradient_accumulation_steps={accumulation}", "logging_steps=1", "save_steps=1000", "warmup_steps=1",
              *VARIED, *demo_charts(name)]
    padded = run(tmp_path / "padded", [*common, "packing=false"])
    assert not packed and all(masked for _, masked, _ in calls)
    del calls[:]
    steps = math.ceil(rows / (batch * accumulation))
    packed_rows = run(tmp_path / "packed", [*common, "packing=true"])
    # the sampler drew the same micro-batches of `batch` samples: every training sample once, in as many steps
    assert sum(packed) == rows and len(packed) == math.ceil(rows / batch)
    assert [r["step"] for r in packed_rows] == [r["step"] for r in padded] == list(range(1, steps + 1))
    for one, other in zip(padded, packed_rows):  # the same samples per step, the same loss
        assert one["loss"] == pytest.approx(other["loss"], rel=1e-4), (one, other)
    # a micro-batch whose samples happen to be equally long stays padded (packing would compute no fewer positions)
    packed_calls = [positions for _, masked, positions in calls if not masked]
    assert packed_calls and set(packed_calls) == {4}


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_held_out_evaluation_and_generation_never_pack(tmp_path, spy, name):
    calls, packed = spy
    rows = run(tmp_path / "run", [f"model_name_or_path={name}", "packing=true", "synthetic_num_train=40",
                                  "eval_fraction=0.2", "eval_steps=3", "eval_samples=4", "max_steps=3",
                                  "logging_steps=1", "save_steps=1000", "warmup_steps=1", *VARIED,
                                  *demo_charts(name)])
    assert any("eval_loss" in r for r in rows)
    assert (tmp_path / "run" / "heldout_answers" / "step-3.jsonl").exists()  # generation ran
    training = [c for c in calls if c[0]]
    held_out = [c for c in calls if not c[0]]
    # accelerate's loader fetches one batch ahead: a fourth micro-batch may be packed but is never trained on
    assert len(training) == 3 and held_out and set(packed) == {8}
    assert any(positions == 4 and not masked for _, masked, positions in training)
    # with an attention mask transformers never reads sample boundaries from position_ids: nothing is packed
    assert all(masked for _, masked, _ in held_out)


def test_rows_hold_whole_samples_longest_first():
    from kit.inputs.packing import first_fit, pack_rows, padding_fraction

    assert first_fit([500, 700, 300, 600, 200], 1024) == [[0, 2, 4], [1], [3]]
    lengths = [200, 500, 400, 700, 100, 300, 800]
    rows = pack_rows(lengths, 1000)  # 800+200, 500+400+100, 700+300; first-fit in this order needs four rows
    assert rows == [[0, 6], [1, 2, 4], [3, 5]] and len(first_fit(lengths, 1000)) == 4
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    lengths = [100, 1400, 300, 900, 120, 700, 1000, 250]
    assert padding_fraction(lengths, 4, 2048, packed=True) < padding_fraction(lengths, 4, 2048, packed=False)


def test_plan_shows_padding_both_ways_and_never_plans_less_memory_for_packing(tmp_path):
    from kit.model import resolve
    from kit.plan.estimate import estimate_memory, model_shape
    from recipes import load as load_recipe

    result = train_cli(["--recipe", "demo", "--plan", "--output", str(tmp_path / "run"), "--set", "packing=true",
                        "--set", "synthetic_num_train=16"])
    assert result.exit_code == 0, result.output
    assert "expected padding:" in result.output
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["plan.json"]  # a plan trains nothing
    shape = model_shape(resolve("random:qwen2-vl-7b", weights=False))
    recipe, _ = load_recipe("chartqa")
    for batch, tokens in ((1, 900), (2, 400), (3, 500), (8, 120)):
        padded = estimate_memory(shape, dict(recipe, per_device_train_batch_size=batch), tokens, 300, "bf16")
        packed = estimate_memory(shape, dict(recipe, per_device_train_batch_size=batch, packing=True), tokens, 300,
                                 "bf16")
        # the largest micro-batch: `batch` samples as long as the longest, whose rows are padded to the longest row
        assert packed["total"] >= padded["total"], (batch, tokens)


@pytest.mark.parametrize("name", UNPACKABLE)
def test_a_family_whose_layers_cross_samples_refuses_packing(tmp_path, name):
    # one line before any step, not a run whose packed samples see each other (charts on Qwen3's 32-pixel grid)
    result = train_cli(["--recipe", "demo", "--output", str(tmp_path / "run"), "--set", f"model_name_or_path={name}",
                        "--set", "packing=true", "--set", "max_steps=1", "--set", "synthetic_num_train=8",
                        "--set", "synthetic_size=160", "--set", "max_pixels=25600"])
    assert result.exit_code == 2, result.output
    assert "packing=false" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
