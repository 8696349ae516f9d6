"""data/synthetic_text.py: numbers the kit draws for the OCR demo, one digit per vision-token cell."""

import pytest

from data.synthetic import SyntheticError
from data.synthetic_text import generate


def test_strips_are_seeded_split_apart_and_one_digit_per_cell(tmp_path):
    from PIL import Image

    train = generate("train", 20, seed=1, size=84, grid=28, cache=tmp_path, progress=False)
    again = generate("train", 20, seed=1, size=84, grid=28, cache=tmp_path, progress=False)
    test = generate("test", 20, seed=1, size=84, grid=28, cache=tmp_path, progress=False)
    assert [s["answers"] for s in train] == [s["answers"] for s in again]
    # no number is in two splits: test numbers have a digit sum divisible by 5, training numbers never
    assert not {s["answers"][0] for s in train} & {s["answers"][0] for s in test}
    assert all(sum(map(int, s["answers"][0])) % 5 == 0 for s in test)
    for sample in train:
        text = sample["answers"][0]
        assert text.isdigit() and 2 <= len(text) <= 3 and sample["qtype"] == f"{len(text)} digits"
        assert sample["messages"][1]["content"][0]["text"] == text
        with Image.open(sample["images"][0]) as image:
            assert image.size == (84, 28)
            dark = image.convert("L").point(lambda v: 255 * (v < 128))
            ink = [dark.crop((28 * i, 0, 28 * i + 28, 28)).getbbox() is not None for i in range(3)]
        assert all(ink[: len(text)]) and not any(ink[len(text):])  # each digit in its cell, the rest blank


def test_a_strip_that_does_not_fit_the_grid_is_one_line():
    with pytest.raises(SyntheticError, match="synthetic_size=140"):
        generate("train", 1, size=90, grid=28, progress=False)
