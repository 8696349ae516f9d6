"""Very large images: decoded once, not once per batch. A chart over HUGE_PIXELS (a 12000x9000 scan is 108 Mpx,
about 3 s and 1.3 GB to decode) is resized once to the grid the processor would resize it to anyway, saved in
the kit's cache keyed by the file (path, mtime, size) and the pixel limits, and every later batch reads that copy.
"""

import hashlib
import warnings
from pathlib import Path

from PIL import Image

HUGE_PIXELS = 16_000_000  # ~4000x4000; below this a decode costs less than reading a cached copy matters


def target_size(width: int, height: int, processor) -> tuple[int, int]:
    """(width, height) after the processor's resize, by the model's family (Qwen's: sides multiples of the grid,
    area within the processor's bounds)."""
    from kit import families

    return families.of_processor(processor).target_size(width, height, processor)


def open_rgb(path, processor) -> Image.Image:
    """The image as RGB; a huge one as its cached copy at the size the model sees (made on first use)."""
    with warnings.catch_warnings():
        # data/lint.py has already named this file in its own note; PIL's warning would not name it
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as opened:
            width, height = opened.size
            if width * height <= HUGE_PIXELS:
                return opened.convert("RGB")
            stat = Path(path).stat()
            size = target_size(width, height, processor)
            key = f"{Path(path).resolve()}|{stat.st_mtime_ns}|{stat.st_size}|{size}"
            from kit.paths import cache_dir, write_with

            cached = cache_dir() / "downscaled" / f"{hashlib.sha1(key.encode()).hexdigest()[:16]}.png"
            if not cached.exists():
                cached.parent.mkdir(parents=True, exist_ok=True)
                small = opened.convert("RGB").resize(size, Image.Resampling.BICUBIC)
                write_with(cached, small.save)
                return small
    with Image.open(cached) as opened:
        return opened.convert("RGB")
