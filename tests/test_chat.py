import pytest
import torch

from data.synthetic import generate
from kit import families
from kit.inputs.chat import IGNORE, SampleTooLong, VisionCollator, set_pixels


# The collator reads every token and the markup from the model's family: each family's tiny model is checked.
@pytest.fixture(scope="module", params=["qwen2-vl", "qwen2.5-vl"])
def processor(request):
    from transformers import AutoProcessor

    from kit.model import tiny_model_dir

    processor = AutoProcessor.from_pretrained(tiny_model_dir(request.param))
    set_pixels(processor, 3136, 19600)
    return processor


@pytest.fixture(scope="module")
def samples(tmp_path_factory, processor):
    return generate("train", 4, seed=1, question_types=["count", "max", "value"], grid=grid_of(processor),
                    cache=tmp_path_factory.mktemp("charts"), progress=False)


def grid_of(processor) -> int:
    return families.of_processor(processor).grid(processor)


def test_only_the_answers_carry_loss(processor, samples):
    batch = VisionCollator(processor, max_length=256)(samples)
    tokenizer = processor.tokenizer
    for row, sample in enumerate(samples):
        kept = batch["labels"][row][batch["labels"][row] != IGNORE]
        answer = sample["messages"][-1]["content"][0]["text"]
        # The answer as the template writes it, closed by <|im_end|> so the model learns to stop.
        assert tokenizer.decode(kept) == answer + "<|im_end|>"
        kept_ids = batch["input_ids"][row][batch["labels"][row] != IGNORE]
        assert torch.equal(kept, kept_ids)


def test_padding_and_vision_tokens_never_carry_loss(processor, samples):
    batch = VisionCollator(processor, max_length=256, train_on_responses_only=False)(samples)
    markup = families.of_processor(processor).markup
    vision_ids = torch.tensor([processor.tokenizer.convert_tokens_to_ids(t) for t in markup.vision_tokens])
    is_vision = torch.isin(batch["input_ids"], vision_ids)
    is_padding = batch["attention_mask"] == 0
    assert is_vision.any() and is_padding.any()  # the batch really has both (charts of different lengths)
    labels = batch["labels"]
    assert (labels[is_vision | is_padding] == IGNORE).all()
    # Everything else is trained on when train_on_responses_only is off.
    rest = ~(is_vision | is_padding)
    assert torch.equal(labels[rest], batch["input_ids"][rest])


def test_image_tokens_match_qwen_resize_rule(processor, samples):
    batch = VisionCollator(processor, max_length=256)(samples[:1])
    image_pad = processor.tokenizer.convert_tokens_to_ids(families.of_processor(processor).markup.image_pad)
    # A 140x140 chart whose sides are multiples of the grid (patch x merge, read from the image processor):
    # (140/grid)^2 merged tokens.
    grid = grid_of(processor)
    assert int((batch["input_ids"] == image_pad).sum()) == (140 // grid) ** 2


def test_every_assistant_turn_of_a_conversation_is_trained(processor, samples):
    two_turns = dict(samples[0], messages=[
        *samples[0]["messages"],
        {"role": "user", "content": [{"type": "text", "text": "Are you sure?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Yes"}]},
    ])
    batch = VisionCollator(processor, max_length=256)([two_turns])
    kept = batch["labels"][0][batch["labels"][0] != IGNORE]
    first = samples[0]["messages"][1]["content"][0]["text"]
    assert processor.tokenizer.decode(kept) == f"{first}<|im_end|>Yes<|im_end|>"


def test_system_prompt_is_applied_and_not_trained(processor, samples):
    collator = VisionCollator(processor, max_length=256, system_prompt="Answer with one word.")
    assert "Answer with one word." in collator.texts(samples[:1])[0]
    batch = collator(samples[:1])
    kept = batch["labels"][0][batch["labels"][0] != IGNORE]
    assert "one word" not in processor.tokenizer.decode(kept)


def test_too_long_sample_is_an_error_not_a_cut_image(processor, samples):
    with pytest.raises(SampleTooLong, match=samples[0]["id"]):
        VisionCollator(processor, max_length=30)(samples[:1])
