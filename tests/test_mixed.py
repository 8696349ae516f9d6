"""Mixed batches: rows with images, with videos, with both and with neither, in any order in one batch, as real
instruction mixes hold them (text-only turns beside image rows, video rows beside image rows). Every family
collates them padded and packed, the plan counts what the collator makes, and a text-only row's loss does not
depend on what shares its batch."""

import json

import pytest
import torch
from PIL import Image

from kit import families
from tests.conftest import train_cli, write_test_video

FAMILIES = families.names()
PACKING = [name for name in FAMILIES if families.by_name(name).packs]


def mixed_rows() -> list[dict]:
    """LLaMA-Factory sharegpt rows: text only, one image, one video, an image and a video, text only again."""
    def row(prompt, answer, **media):
        return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
                **media}

    return [row("What is two plus two?", "four"),
            row("<image>How many bars?", "3", images=["a.png"]),
            row("<video>Where does it move?", "right", videos=["clip.mp4"]),
            row("<image><video>Is the chart in the video?", "no", images=["b.png"], videos=["clip.mp4"]),
            row("Name a colour.", "blue, like the sky at noon")]


@pytest.fixture()
def mixed_file(tmp_path):
    Image.new("RGB", (56, 56), (200, 30, 30)).save(tmp_path / "a.png")
    Image.new("RGB", (84, 56), (30, 200, 30)).save(tmp_path / "b.png")
    write_test_video(tmp_path / "clip.mp4", frames_count=4)
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(mixed_rows(), indent=1))
    return path


def load_samples(path):
    import data

    return data.load({"dataset": f"jsonl:{path}", "dataset_split": "train", "limit": 0})


def processor_for(name: str):
    from transformers import AutoProcessor

    from kit import model as models
    from kit.inputs import chat, video

    processor = AutoProcessor.from_pretrained(models.resolve(f"tiny:{name}"))
    chat.set_pixels(processor, 3136, 19600)
    video.set_sampling(processor, 2.0, 4)
    return processor


ORDERS = [[0, 1, 2, 3, 4], [3, 0, 4, 2, 1], [2, 4, 1]]


@pytest.mark.parametrize("name", FAMILIES)
def test_plan_counts_equal_the_collators_in_mixed_batches(mixed_file, name):
    from kit.inputs.chat import VisionCollator
    from kit.plan import estimate

    processor = processor_for(name)
    samples = load_samples(mixed_file)
    assert [(len(s["images"]), len(s.get("videos") or [])) for s in samples] == [(0, 0), (1, 0), (0, 1), (1, 1),
                                                                                  (0, 0)]
    findings, counts = estimate.preflight(samples, processor, {"system_prompt": "", "max_length": 4096, "fps": 2.0,
                                                            "max_frames": 4})
    assert findings == []
    collator = VisionCollator(processor, max_length=4096)
    for order in ORDERS:
        batch = collator([samples[i] for i in order])
        lengths = batch["attention_mask"].sum(dim=1).tolist()
        assert lengths == [sum(counts[i]) for i in order], (order, lengths)
        assert batch["image_grid_thw"].shape[0] == sum(len(samples[i]["images"]) for i in order)
        assert batch["video_grid_thw"].shape[0] == sum(len(samples[i].get("videos") or []) for i in order)


def row_losses(model, batch) -> list[float]:
    """Each row's mean loss over its own answer tokens (the model's shift: logits at t predict labels at t+1)."""
    with torch.no_grad():
        logits = model(**batch).logits.float()
    labels = batch["labels"]
    losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none")
    kept = labels[:, 1:] != -100
    return ((losses * kept).sum(dim=1) / kept.sum(dim=1)).tolist()


def load_model(name: str):
    from transformers import AutoModelForImageTextToText

    from kit import model as models

    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(models.resolve(f"tiny:{name}"), dtype=torch.float32)
    return model.eval()


@pytest.mark.parametrize("name", FAMILIES)
def test_a_text_only_rows_loss_is_the_same_alone_and_in_a_mixed_batch(mixed_file, name):
    from kit.inputs.chat import VisionCollator

    processor, model = processor_for(name), load_model(name)
    samples = load_samples(mixed_file)
    collator = VisionCollator(processor, max_length=4096)
    alone = [row_losses(model, collator([samples[i]]))[0] for i in (0, 4)]
    # the text-only rows after rows with images and videos: their positions and padding must not move them
    mixed = row_losses(model, collator([samples[i] for i in (3, 0, 2, 1, 4)]))
    assert mixed[1] == pytest.approx(alone[0], rel=1e-4, abs=1e-5)
    assert mixed[4] == pytest.approx(alone[1], rel=1e-4, abs=1e-5)
    # the control: the two text-only rows differ, so a row's loss is not one number whatever the row
    assert abs(alone[0] - alone[1]) > 1e-3


@pytest.mark.parametrize("name", PACKING)
def test_a_packed_mixed_batch_has_the_padded_loss(mixed_file, name):
    from kit.inputs import packing
    from kit.inputs.chat import VisionCollator

    processor, model = processor_for(name), load_model(name)
    samples = [load_samples(mixed_file)[i] for i in (3, 0, 2, 1, 4)]
    padded = VisionCollator(processor, max_length=4096)(samples)
    packer = packing.for_model(model, {"packing": True, "max_length": 4096}, processor.tokenizer.pad_token_id)
    packed = VisionCollator(processor, max_length=4096, packer=packer)(samples)
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed  # all five share one row
    with torch.no_grad():
        padded_loss, packed_loss = model(**padded).loss, model(**packed).loss
    assert torch.allclose(packed_loss, padded_loss, rtol=1e-5, atol=1e-6), (packed_loss, padded_loss)


@pytest.mark.slow
@pytest.mark.parametrize("name, pack", [(name, pack) for name in FAMILIES for pack in (False, True)
                                        if pack is False or name in PACKING])
def test_mixed_data_trains_in_batches_on_every_family(tmp_path, mixed_file, name, pack):
    run = tmp_path / "run"
    settings = [f"dataset=jsonl:{mixed_file}", f"model_name_or_path=tiny:{name}", "per_device_train_batch_size=5",
                "max_steps=2", "eval_split=", "eval_fraction=0", "save_steps=2", "logging_steps=1",
                f"packing={str(pack).lower()}", "max_length=4096", "fps=2", "max_frames=4"]
    args = ["--recipe", "demo", "--output", str(run)]
    for item in settings:
        args += ["--set", item]
    result = train_cli(args)
    assert result.exit_code == 0, result.output
    losses = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in entry for entry in losses)


@pytest.mark.parametrize("name", FAMILIES)
def test_a_video_of_one_frame_collates_and_is_counted(tmp_path, name):
    """Fewer frames than one token grid in time (a one-frame list, max_frames=1): Qwen3-VL's processor refuses
    such a video, so the last frame is repeated as Qwen2-VL's processor does itself."""
    from kit.inputs import video
    from kit.inputs.chat import VisionCollator
    from kit.plan import estimate

    Image.new("RGB", (84, 56), (10, 120, 200)).save(tmp_path / "only.png")
    write_test_video(tmp_path / "clip.mp4", frames_count=4)
    rows = [{"messages": [{"role": "user", "content": "<video>What is shown?"},
                          {"role": "assistant", "content": "a bar"}], "videos": [clip]}
            for clip in (["only.png"], "clip.mp4")]
    path = tmp_path / "one.json"
    path.write_text(json.dumps(rows))
    samples = load_samples(path)
    processor = processor_for(name)
    video.set_sampling(processor, 2.0, 1)
    findings, counts = estimate.preflight(samples, processor, {"system_prompt": "", "max_length": 4096, "fps": 2.0,
                                                            "max_frames": 1})
    batch = VisionCollator(processor, max_length=4096)(samples)
    assert findings == [] and batch["attention_mask"].sum(dim=1).tolist() == [sum(c) for c in counts]
    assert batch["video_grid_thw"][:, 0].tolist() == [1, 1]
