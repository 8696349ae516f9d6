"""ChartQA (HuggingFaceM4/ChartQA on the hub): chart images with a query and its reference answers.

`human_or_machine` tells the subsets apart: 0 = questions written by people, 1 = generated ("augmented").
"""

SUBSETS = {0: "human", 1: "augmented"}


def to_sample(row: dict, index: int, split: str) -> dict:
    answers = row["label"] if isinstance(row["label"], list) else [row["label"]]
    return {
        "id": f"chartqa-{split}-{index}",
        "images": [row["image"]],
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": row["query"]}]},
            {"role": "assistant", "content": [{"type": "text", "text": answers[0]}]},
        ],
        "answers": answers,
        "subset": SUBSETS.get(row.get("human_or_machine"), "unknown"),
    }


def load(split: str = "train", limit: int | None = None) -> list[dict]:
    from data.hub import load_dataset  # fails fast, in one line, without network

    rows = load_dataset("HuggingFaceM4/ChartQA", split=f"{split}[:{limit}]" if limit else split)
    return [to_sample(row, i, split) for i, row in enumerate(rows)]
