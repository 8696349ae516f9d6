"""Where samples come from. Every source yields the one sample format:

    {"id": str, "images": [PIL image or path], "messages": [user turn with {"type": "image"} + text,
     assistant turn with the answer], "answers": [every accepted answer], ...source extras}

The recipe's system prompt and pixel limits apply to all sources later, in kit/chat.py.
"""


def load(recipe: dict, split: str | None = None, progress: bool = True) -> list[dict]:
    """Samples of the recipe's dataset; `split` defaults to the recipe's `dataset_split`."""
    split = split or recipe["dataset_split"]
    name, limit = recipe["dataset"], recipe["limit"] or None
    if name == "synthetic":
        from data.synthetic import generate

        num = recipe["synthetic_num_train"] if split == "train" else recipe["synthetic_num_test"]
        samples = generate(split, min(num, limit or num), seed=recipe["synthetic_seed"],
                           chart_types=recipe["synthetic_chart_types"],
                           question_types=recipe["synthetic_question_types"],
                           layout=recipe["synthetic_layout"], size=recipe["synthetic_size"], progress=progress)
    elif name == "chartqa":
        from data.chartqa import load as load_chartqa

        samples = load_chartqa(split, limit)
    elif name == "latex_ocr":
        from data.latex_ocr import load as load_latex

        samples = load_latex(split, limit)
    elif name.startswith("jsonl:"):
        from data.jsonl import load as load_jsonl

        samples = load_jsonl(name.split(":", 1)[1], limit)
    else:
        raise ValueError(f"unknown dataset {name!r}")
    return samples
