"""Messages -> model inputs. The collator is ours and visible: which tokens carry loss is decided here.

Labels are -100 on padding, on every vision token (the family's vision start/end and image/video pads) and,
with `train_on_responses_only`, on everything outside the assistant's answers. The answer's closing turn token
(<|im_end|>) keeps its label so the model learns to stop. Tokens and chat markup come from the model's family
(kit/families/), found from the processor unless given.
"""

from pathlib import Path

from PIL import Image

from kit import families
from kit.errors import UserError

IGNORE = -100


class BadSample(UserError, ValueError):
    """A sample the processor cannot turn into model inputs; the message names it and the fix."""


class SampleTooLong(UserError, ValueError):
    """A sample whose tokens (image tokens included) exceed max_length; it is never cut inside an image."""


def open_image(image) -> Image.Image:
    """An image as PIL opens it (header read, pixels not yet decoded): a PIL image, a path, raw bytes, or a
    Hugging Face {"bytes", "path"} dict (the lazy samples of data/hf.py)."""
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, dict):
        image = image.get("bytes") or image.get("path")
    if isinstance(image, (bytes, bytearray)):
        import io

        return Image.open(io.BytesIO(image))
    return Image.open(image)


def image_size(image) -> tuple[int, int]:
    """(width, height) from the header alone; a PIL image passed in is left open."""
    if isinstance(image, Image.Image):
        return image.size
    with open_image(image) as opened:
        return opened.size


def load_image(image, processor=None) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if processor is not None and isinstance(image, (str, Path)):
        # a huge file is decoded once, then read from a copy at the size the model sees
        from kit.inputs.images import open_rgb

        return open_rgb(image, processor)
    with open_image(image) as opened:
        return opened.convert("RGB")


def batch_images(samples: list[dict], processor) -> list[Image.Image] | None:
    """Every image of a batch as one flat list in row order, None when it has none. The processor fills the
    <|image_pad|> slots of all rows in that order, so rows without images (text-only, video-only) sit anywhere
    in a batch: a per-row list would hold an empty entry for them, which the image processor refuses."""
    images = [load_image(image, processor) for sample in samples for image in sample.get("images") or []]
    return images or None


def with_system(messages: list[dict], system_prompt: str) -> list[dict]:
    """Messages with `system_prompt` as the system turn (replacing one already there); unchanged if empty."""
    if not system_prompt:
        return messages
    rest = [m for m in messages if m["role"] != "system"]
    return [{"role": "system", "content": [{"type": "text", "text": system_prompt}]}, *rest]


def prompt_messages(messages: list[dict]) -> list[dict]:
    """The conversation up to (not including) the last assistant answer: what generation starts from."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=len(messages))
    return messages[:last]


def set_pixels(processor, min_pixels: int, max_pixels: int):
    """Qwen's resize rule: sides rounded to multiples of the family's grid, area within [min_pixels, max_pixels].

    Only `size` is written: it is what transformers 5 resizes by, and Unsloth turns `min_pixels`/`max_pixels`
    into read-only properties over it (assigning them raises AttributeError once unsloth is imported)."""
    image_processor = processor.image_processor
    image_processor.size = type(image_processor.size)(shortest_edge=min_pixels, longest_edge=max_pixels)
    video_processor = getattr(processor, "video_processor", None)
    if video_processor is not None:  # a video's frames are sized like images (kit/inputs/video.py)
        video_processor.size = type(video_processor.size)(shortest_edge=min_pixels, longest_edge=max_pixels)


def set_limits(processor, recipe: dict):
    """The recipe's image pixel limits and video sampling on the processor, as training used them (a run
    recorded before videos has no fps / max_frames: the processor's defaults)."""
    from kit.inputs.video import set_sampling

    set_pixels(processor, recipe["min_pixels"], recipe["max_pixels"])
    set_sampling(processor, recipe.get("fps"), recipe.get("max_frames"))


class VisionCollator:
    """Batches {"images", "messages"} samples for training (right padding, labels masked as above)."""

    def __init__(self, processor, max_length: int, train_on_responses_only: bool = True, system_prompt: str = "",
                 family: families.Family | None = None, packer=None):
        self.processor = processor
        self.packer = packer  # kit.inputs.packing.Packer: training batches packed into rows; `padded` never packs
        self.max_length = max_length
        self.train_on_responses_only = train_on_responses_only
        self.system_prompt = system_prompt
        self.family = family or families.of_processor(processor)
        markup, tokenizer = self.family.markup, processor.tokenizer
        self.vision_ids = [tokenizer.convert_tokens_to_ids(t) for t in markup.vision_tokens]
        self.im_start = tokenizer.convert_tokens_to_ids(markup.im_start)
        self.im_end = tokenizer.convert_tokens_to_ids(markup.im_end)
        self.assistant_header = tokenizer.encode(markup.assistant_header, add_special_tokens=False)
        # an answer without thinking starts after the template's empty think block, which carries no loss; a
        # think block the row's answer has is part of the answer and keeps its labels
        self.empty_think = tokenizer.encode(markup.empty_think, add_special_tokens=False) if markup.think else []

    def texts(self, samples):
        return [self.family.chat_text(self.processor, with_system(s["messages"], self.system_prompt))
                for s in samples]

    def __call__(self, samples: list[dict]) -> dict:
        batch = self.padded(samples)
        return batch if self.packer is None else self.packer(batch)

    def padded(self, samples: list[dict]) -> dict:
        self.processor.tokenizer.padding_side = "right"
        texts = self.texts(samples)
        from kit.inputs.video import batch_videos

        try:
            batch = self.processor(text=texts, images=batch_images(samples, self.processor),
                                   **batch_videos(samples, self.processor), padding=True, return_tensors="pt")
        except StopIteration:
            # Escaping a collator, a StopIteration reads to the trainer as "end of data": training would stop
            # early and look finished. It means more image slots in the text than images.
            raise BadSample(mismatched_images(samples, texts, self.family.markup.image_pad)) from None
        lengths = batch["attention_mask"].sum(dim=1)
        for sample, length in zip(samples, lengths.tolist()):
            if length > self.max_length:
                raise SampleTooLong(f"sample {sample.get('id', '?')} has {length} tokens (image tokens included), "
                                    f"more than max_length={self.max_length}; raise max_length or lower max_pixels")
        batch["labels"] = self.labels(batch["input_ids"], batch["attention_mask"])
        return batch

    def labels(self, input_ids, attention_mask):
        import torch

        labels = input_ids.clone()
        labels[attention_mask == 0] = IGNORE
        labels[torch.isin(input_ids, torch.tensor(self.vision_ids))] = IGNORE
        if self.train_on_responses_only:
            keep = torch.zeros_like(labels, dtype=torch.bool)
            for row, ids in enumerate(input_ids.tolist()):
                for start, end in self.answer_spans(ids):
                    keep[row, start:end] = True
            labels[~keep] = IGNORE
        return labels

    def answer_spans(self, ids: list[int]):
        """[start, end) of each assistant answer: after the turn start and assistant header (and an empty think
        block), through the turn end."""
        header = [self.im_start, *self.assistant_header]
        i = 0
        while i <= len(ids) - len(header):
            if ids[i:i + len(header)] == header:
                start = i + len(header)
                if self.empty_think and ids[start:start + len(self.empty_think)] == self.empty_think:
                    start += len(self.empty_think)
                end = start
                while end < len(ids) and ids[end] != self.im_end:
                    end += 1
                yield start, min(end + 1, len(ids))
                i = end
            else:
                i += 1


def mismatched_images(samples: list[dict], texts: list[str], image_pad: str) -> str:
    """The message for a batch whose text holds more image slots (`image_pad` tokens) than it has images."""
    bad = [s for s, text in zip(samples, texts) if text.count(image_pad) != len(s["images"])] or samples
    names = ", ".join(str(s.get("source") or s.get("id", "?")) for s in bad[:5])
    return (f"{names}: the text holds more image slots ({image_pad}) than the row has images; remove Qwen's "
            "vision tokens from the text (python -m data.lint finds every such row)")


def generation_inputs(processor, batch: list[dict], system_prompt: str = ""):
    """Left-padded inputs for model.generate from samples ({"images", "messages"}); answers are left out."""
    processor.tokenizer.padding_side = "left"
    family = families.of_processor(processor)
    texts = [family.chat_text(processor, with_system(prompt_messages(s["messages"]), system_prompt),
                              add_generation_prompt=True) for s in batch]
    from kit.inputs.video import batch_videos

    return processor(text=texts, images=batch_images(batch, processor), **batch_videos(batch, processor),
                     padding=True, return_tensors="pt")
