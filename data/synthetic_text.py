"""Synthetic numbers to read (the OCR demo): a strip of digits drawn from a seed, one digit per vision-token column,
and its text as the answer, so the kit can show a model learning a task scored by character error rate.

The strip is `size` pixels wide and one token (`grid` pixels) high: every digit sits in its own token's cell, as
the aligned charts' bars do (data/synthetic.py), which is what a tiny model can learn to read in minutes. Each
sample's question type is its length ("3 digits"), so reports break the error rate down by it. The splits share
no number: test and val numbers have a digit sum divisible by 5, training numbers never do, so a model can only
score on them by reading each digit, not by recalling a strip it was trained on. Rendered PNGs are cached, keyed
by everything that changes the pixels.
"""

import hashlib
import json
import random
from pathlib import Path

from data.synthetic import SPLIT_OFFSETS, SyntheticError

QUESTION = "What number is written in the image?"
DIGITS = "0123456789"
INK, PAPER = (0, 0, 0), (255, 255, 255)


def held_out(text: str) -> bool:
    """Numbers kept for test and val (a fifth of them): never drawn for training."""
    return sum(map(int, text)) % 5 == 0


def make_spec(index: int, seed: int, slots: int, split: str = "train") -> dict:
    """The digits of one strip, from (seed, index) alone: 2 to `slots` of them, from the left; drawn again until
    the number belongs to the split's side (held_out)."""
    rng = random.Random(f"text:{seed}:{index}")
    while True:
        text = "".join(rng.choice(DIGITS) for _ in range(rng.randint(2, slots)))
        if held_out(text) == (split != "train"):
            return {"text": text}


def font(size: int):
    """DejaVu Sans Bold (matplotlib's own font file, so the pixels are the same on every machine with these pins):
    thick strokes that fill the cell, so the digits differ in where their ink is, which a tiny model sees first."""
    from matplotlib import font_manager
    from PIL import ImageFont

    found = font_manager.findfont(font_manager.FontProperties(family="DejaVu Sans", weight="bold"))
    return ImageFont.truetype(found, size)


def render(text: str, size: int, grid: int, path: Path):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, grid), PAPER)
    draw = ImageDraw.Draw(image)
    face = font(grid)
    for i, digit in enumerate(text):  # centred in its token's cell
        draw.text((i * grid + grid / 2, grid / 2), digit, fill=INK, font=face, anchor="mm")
    image.save(path, format="PNG")


def generate(split: str = "train", num: int = 100, seed: int = 0, size: int = 140, grid: int = 0,
             cache: Path | None = None, progress: bool = True) -> list[dict]:
    """`num` strips of `split` (each split draws from its own index range of the same seed); `grid`: the model's
    pixels per vision token (the recipe's synthetic_grid, filled in from the model)."""
    from tqdm import tqdm

    from kit.paths import cache_dir, write_with

    if split not in SPLIT_OFFSETS:
        raise ValueError(f"synthetic_text split must be one of {', '.join(SPLIT_OFFSETS)}, not {split!r}")
    if grid <= 0:
        raise SyntheticError("synthetic_text draws one digit per vision token: set synthetic_grid to the model's "
                             "pixels per token (patch x merge, e.g. --set synthetic_grid=28)")
    if size % grid or size < 2 * grid:
        raise SyntheticError(f"synthetic_text needs a synthetic_size that is a multiple of the model's {grid}-pixel "
                             f"grid (>= {2 * grid}), not {size}; e.g. --set synthetic_size={5 * grid}")
    offset, slots = SPLIT_OFFSETS[split], size // grid
    key = json.dumps(["text-bold-heldout", seed, size, grid], sort_keys=True)
    folder = Path(cache or cache_dir() / "synthetic") / hashlib.sha1(key.encode()).hexdigest()[:12]
    folder.mkdir(parents=True, exist_ok=True)
    samples = []
    for i in tqdm(range(num), desc=f"synthetic_text {split}", disable=not progress, mininterval=2):
        text = make_spec(offset + i, seed, slots, split)["text"]
        path = folder / f"{offset + i:08d}.png"
        if not path.exists():
            write_with(path, lambda tmp, text=text: render(text, size, grid, tmp))
        samples.append({
            "id": f"synthetic_text-{split}-{i}",
            "images": [str(path)],
            "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]},
                {"role": "assistant", "content": [{"type": "text", "text": text}]},
            ],
            "answers": [text],
            "qtype": f"{len(text)} digits",
        })
    return samples
