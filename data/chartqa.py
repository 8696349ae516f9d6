"""ChartQA (HuggingFaceM4/ChartQA on the hub): chart images with a query and its reference answers.

A preset of data/hf.py: `dataset=chartqa` is `dataset=hf:HuggingFaceM4/ChartQA` with the columns below.
Splits: train (28,299 rows), val (1,920), test (2,500). `human_or_machine` tells the subsets apart:
0 = questions written by people, 1 = generated ("augmented").
"""

from data.hf import CHARTQA_COLUMNS, SUBSET_NAMES, load as load_hf

SUBSETS = SUBSET_NAMES["human_or_machine"]
COLUMNS = CHARTQA_COLUMNS


def load(split: str = "train", limit: int | None = None, columns: list | None = None):
    """Lazy samples (Arrow-backed; images stay encoded until a batch needs them)."""
    return load_hf("chartqa", split, limit, columns)
