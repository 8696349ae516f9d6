"""LaTeX OCR (unsloth/LaTeX_OCR on the hub): an image of a formula and its LaTeX source."""

INSTRUCTION = "Write the LaTeX representation for this image."


def to_sample(row: dict, index: int, split: str) -> dict:
    return {
        "id": f"latex_ocr-{split}-{index}",
        "images": [row["image"]],
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": INSTRUCTION}]},
            {"role": "assistant", "content": [{"type": "text", "text": row["text"]}]},
        ],
        "answers": [row["text"]],
    }


def load(split: str = "train", limit: int | None = None) -> list[dict]:
    from data.hub import load_dataset  # fails fast, in one line, without network

    rows = load_dataset("unsloth/LaTeX_OCR", split=f"{split}[:{limit}]" if limit else split)
    return [to_sample(row, i, split) for i, row in enumerate(rows)]
