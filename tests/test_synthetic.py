import hashlib
from pathlib import Path

import pytest
from PIL import Image

from data.synthetic import LABELS, SyntheticError, generate, make_spec

GRID = 28  # Qwen2-VL's and Qwen2.5-VL's vision token: 14-pixel patches merged 2x2 (the kit reads it from the model)


def digest(path) -> str:
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()


def test_same_seed_same_charts_and_questions(tmp_path):
    first = generate("train", 12, seed=5, grid=GRID, cache=tmp_path / "a", progress=False)
    second = generate("train", 12, seed=5, grid=GRID, cache=tmp_path / "b", progress=False)
    assert [s["messages"] for s in first] == [s["messages"] for s in second]
    assert [digest(s["images"][0]) for s in first] == [digest(s["images"][0]) for s in second]
    other = generate("train", 12, seed=6, grid=GRID, cache=tmp_path / "c", progress=False)
    assert [s["messages"] for s in other] != [s["messages"] for s in first]


def test_train_and_test_do_not_share_charts(tmp_path):
    train = generate("train", 30, seed=0, grid=GRID, cache=tmp_path, progress=False)
    test = generate("test", 30, seed=0, grid=GRID, cache=tmp_path, progress=False)
    assert not {s["images"][0] for s in train} & {s["images"][0] for s in test}


def test_answers_follow_from_the_drawn_values():
    for index in range(300):
        spec = make_spec(index, 0, ["bar", "line"], ["count", "max", "min", "value", "last"], "aligned", 140, GRID)
        labels, values = spec["labels"], spec["values"]
        assert len(set(values)) == len(values)  # max/min are unambiguous
        assert labels == LABELS[:len(values)]
        expected = {
            "count": str(len(values)),
            "max": labels[max(range(len(values)), key=values.__getitem__)],
            "min": labels[min(range(len(values)), key=values.__getitem__)],
            "last": labels[len(values) - 1],  # the rightmost bar or point
        }.get(spec["qtype"])
        if spec["qtype"] == "value":
            asked = spec["question"].rstrip("?").split()[-1]
            expected = str(values[labels.index(asked)])
        assert spec["answer"] == expected, spec


def test_aligned_charts_fit_the_token_grid(tmp_path):
    sample = generate("test", 1, seed=0, size=140, grid=GRID, cache=tmp_path, progress=False)[0]
    with Image.open(sample["images"][0]) as image:
        assert image.size == (140, 140)  # 5 x 5 columns of 28 pixels: one vision token per bar slot


def test_aligned_slots_follow_the_grid():
    # a 32-pixel grid (Qwen3-VL's 16-pixel patches) on a 160-pixel chart has 5 slots, on a 320-pixel one 10,
    # so the bar count is bounded by the slots that fit (and by the 8 labels)
    counts = {size: max(len(make_spec(i, 0, ["bar"], ["count"], "aligned", size, 32)["values"]) for i in range(200))
              for size in (160, 320)}
    assert counts == {160: 5, 320: 8}


def test_aligned_charts_without_a_grid_or_off_it_are_refused(tmp_path):
    with pytest.raises(SyntheticError, match="synthetic_grid"):
        generate("test", 1, cache=tmp_path, progress=False)
    with pytest.raises(SyntheticError, match="synthetic_size=160"):
        generate("test", 1, size=140, grid=32, cache=tmp_path, progress=False)


def test_chartqa_layout_is_chartqa_sized(tmp_path):
    sample = generate("test", 1, seed=0, layout="chartqa", cache=tmp_path, progress=False)[0]
    with Image.open(sample["images"][0]) as image:
        assert image.size == (800, 600)
