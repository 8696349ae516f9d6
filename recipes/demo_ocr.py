"""The second laptop demo: the tiny random-initialised Qwen2-VL learns to read numbers the kit draws itself, scored
by character error rate.

    python train.py --recipe demo_ocr        # a minute or two of training on two cores
    make demo-ocr                            # train -> eval: CER of fine-tuned vs base vs shuffled images

Set up as the chart demo (recipes/demo.py, docs/demo.md): full fine-tuning of the tiny model, and images whose
content lines up with its vision tokens (one bold digit per 28-pixel token). Numbers of 2 to 3 digits were read
within 1,000 steps; with up to 5 digits the loss stayed on the "right length, digits guessed" plateau
(about 1.8) through 2,000 steps.
"""

from recipes.base import BASE
from recipes.demo import TINY_FROM_SCRATCH

RECIPE = {
    **BASE,
    **TINY_FROM_SCRATCH,  # the chart demo's model and schedule
    "dataset": "synthetic_text",
    "synthetic_num_train": 3000,  # drawn once (seconds) and cached
    "synthetic_num_test": 200,
    "synthetic_size": 84,  # 3 digits at most, one per token column of Qwen2-VL's 28-pixel grid
    # 84x28 = 2,352 pixels, below the processors' default floor (3,136): both limits at the strip's size, so it is
    # never resized and each digit stays in its token
    "min_pixels": 2352,
    "max_pixels": 2352,
    "metric_for_best_model": "cer",  # reading: character error rate, with WER and exact match beside it
    "max_completion_length": 8,  # 3 digits (one token each), the end of turn, and room to ramble
    "max_length": 128,
}
