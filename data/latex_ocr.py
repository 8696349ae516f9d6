"""LaTeX OCR (unsloth/LaTeX_OCR on the hub): an image of a formula and its LaTeX source.

A preset of data/hf.py: `dataset=latex_ocr` is `dataset=hf:unsloth/LaTeX_OCR` with every row asked INSTRUCTION.
"""

from data.hf import PRESETS, load as load_hf

INSTRUCTION = PRESETS["latex_ocr"][1]["instruction"]


def load(split: str = "train", limit: int | None = None, columns: list | None = None):
    """Lazy samples (Arrow-backed; images stay encoded until a batch needs them)."""
    return load_hf("latex_ocr", split, limit, columns)
