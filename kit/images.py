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
    """(width, height) after Qwen's resize: sides multiples of patch*merge, area within the processor's bounds."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    ip = processor.image_processor
    h, w = smart_resize(height, width, factor=ip.patch_size * ip.merge_size,
                        min_pixels=ip.size["shortest_edge"], max_pixels=ip.size["longest_edge"])
    return w, h


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
            from kit.paths import cache_dir

            cached = cache_dir() / "downscaled" / f"{hashlib.sha1(key.encode()).hexdigest()[:16]}.png"
            if not cached.exists():
                cached.parent.mkdir(parents=True, exist_ok=True)
                small = opened.convert("RGB").resize(size, Image.Resampling.BICUBIC)
                tmp = cached.with_suffix(".tmp.png")
                small.save(tmp)
                tmp.replace(cached)
                return small
    with Image.open(cached) as opened:
        return opened.convert("RGB")
