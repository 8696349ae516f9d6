import hashlib
from pathlib import Path

from PIL import Image

from data.synthetic import LABELS, generate, make_spec


def digest(path) -> str:
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()


def test_same_seed_same_charts_and_questions(tmp_path):
    first = generate("train", 12, seed=5, cache=tmp_path / "a", progress=False)
    second = generate("train", 12, seed=5, cache=tmp_path / "b", progress=False)
    assert [s["messages"] for s in first] == [s["messages"] for s in second]
    assert [digest(s["images"][0]) for s in first] == [digest(s["images"][0]) for s in second]
    other = generate("train", 12, seed=6, cache=tmp_path / "c", progress=False)
    assert [s["messages"] for s in other] != [s["messages"] for s in first]


def test_train_and_test_do_not_share_charts(tmp_path):
    train = generate("train", 30, seed=0, cache=tmp_path, progress=False)
    test = generate("test", 30, seed=0, cache=tmp_path, progress=False)
    assert not {s["images"][0] for s in train} & {s["images"][0] for s in test}


def test_answers_follow_from_the_drawn_values():
    for index in range(300):
        spec = make_spec(index, 0, ["bar", "line"], ["count", "max", "min", "value"], "aligned", 140)
        labels, values = spec["labels"], spec["values"]
        assert len(set(values)) == len(values)  # max/min are unambiguous
        assert labels == LABELS[:len(values)]
        expected = {
            "count": str(len(values)),
            "max": labels[max(range(len(values)), key=values.__getitem__)],
            "min": labels[min(range(len(values)), key=values.__getitem__)],
        }.get(spec["qtype"])
        if spec["qtype"] == "value":
            asked = spec["question"].rstrip("?").split()[-1]
            expected = str(values[labels.index(asked)])
        assert spec["answer"] == expected, spec


def test_aligned_charts_fit_the_token_grid(tmp_path):
    sample = generate("test", 1, seed=0, size=140, cache=tmp_path, progress=False)[0]
    with Image.open(sample["images"][0]) as image:
        assert image.size == (140, 140)  # 5 x 5 columns of 28 pixels: one vision token per bar slot


def test_chartqa_layout_is_chartqa_sized(tmp_path):
    sample = generate("test", 1, seed=0, layout="chartqa", cache=tmp_path, progress=False)[0]
    with Image.open(sample["images"][0]) as image:
        assert image.size == (800, 600)
