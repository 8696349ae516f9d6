"""Videos: a file (decoded with PyAV) or a list of frame files, sampled at `fps` frames a second up to
`max_frames`, each frame sized like an image (min_pixels / max_pixels), and handed to the processor's video
path one batch at a time. The plan counts a video's tokens from its header and packet count alone.

Qwen's video tokens: frames are merged in pairs in time (temporal_patch_size 2, an odd last frame is
repeated), so a video is ceil(frames / 2) x (h / 28) x (w / 28) tokens.
"""

import math
from fractions import Fraction

import numpy as np
from PIL import Image

from kit.errors import UserError

DEFAULT_FPS = 2.0  # Qwen's own default sampling rate (qwen-vl-utils FPS)
DEFAULT_MAX_FRAMES = 16


class BadVideo(UserError):
    """A video that cannot be read; the message names the file."""


def set_sampling(processor, fps: float | None, max_frames: int | None):
    """Write the recipe's sampling into the video processor's own fields, which the collator and the plan
    read back: frames are sampled here, so the processor must not sample again."""
    video_processor = getattr(processor, "video_processor", None)
    if video_processor is None:
        return
    video_processor.fps = float(fps or DEFAULT_FPS)
    video_processor.max_frames = int(max_frames or DEFAULT_MAX_FRAMES)
    video_processor.do_sample_frames = False
    video_processor.cap_pixels_per_frame = False  # each frame is capped by max_pixels; max_frames bounds the rest


def sampling(processor, recipe: dict | None = None) -> tuple[float, int]:
    """(fps, max_frames): the recipe's when given (the plan), else what set_sampling wrote (the collator)."""
    if recipe is not None:
        return float(recipe.get("fps") or DEFAULT_FPS), int(recipe.get("max_frames") or DEFAULT_MAX_FRAMES)
    video_processor = processor.video_processor
    fps = getattr(video_processor, "fps", None) or DEFAULT_FPS
    max_frames = getattr(video_processor, "max_frames", None) or DEFAULT_MAX_FRAMES
    return float(fps), int(max_frames)


def pick(total: int, rate: float, fps: float, max_frames: int) -> list[int]:
    """Indices of the frames kept of `total` at `rate` frames/s: `fps` a second, at most `max_frames`,
    spread evenly over the whole video."""
    if total <= 0:
        return []
    wanted = round(total / rate * fps) if rate > 0 else total
    count = max(1, min(wanted, max_frames, total))
    return sorted({min(total - 1, int((i + 0.5) * total / count)) for i in range(count)})


def _stream_facts(path: str) -> tuple[int, float, int, int]:
    """(frames, frames a second, width, height) from the container: packets are counted, nothing decoded."""
    import av

    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise BadVideo(f"{path}: no video stream in the file")
            stream = container.streams.video[0]
            rate = float(stream.average_rate or stream.guessed_rate or Fraction(1))
            width, height = stream.codec_context.width, stream.codec_context.height
            total = sum(1 for packet in container.demux(stream) if packet.size)
    except (av.FFmpegError, OSError) as error:
        raise BadVideo(f"{path}: video unreadable ({error})") from None
    return total, rate, width, height


def sampled(video, processor, recipe: dict | None = None) -> tuple[list[int], float, int, int, int]:
    """(indices of the frames kept, the source's frames a second, its frames, width, height) of a video as the
    collator decodes it. A list of frame files is taken as sampled at `fps` already. Fewer frames than make one
    token grid in time (a one-frame video, max_frames=1) repeat the last: Qwen2-VL's processor does so itself,
    Qwen3-VL's refuses the video."""
    fps, max_frames = sampling(processor, recipe)
    if isinstance(video, list):  # frame files: every frame is a sample of its own, up to max_frames
        with Image.open(video[0]) as first:  # the header only
            width, height = first.size
        indices, rate, total = pick(len(video), fps, fps, max_frames), fps, len(video)
    else:
        total, rate, width, height = _stream_facts(str(video))
        indices = pick(total, rate, fps, max_frames)
    short = getattr(processor.video_processor, "temporal_patch_size", 1) - len(indices)
    return indices + indices[-1:] * max(0, short), rate, total, width, height


def probe(video, processor, recipe: dict | None = None) -> tuple[int, int, int]:
    """(frames kept, width, height) of a video as the collator will decode it."""
    indices, _, _, width, height = sampled(video, processor, recipe)
    return len(indices), width, height


def group_seconds(indices: list[int], rate: float, temporal: int) -> list[float]:
    """The time of each frame group the model sees (`temporal` frames merge into one, an odd last frame
    repeated): the middle of its first and last frame, as Qwen3-VL's processor writes it before the group."""
    padded = indices + [indices[-1]] * (-len(indices) % temporal)
    return [(padded[i] + padded[i + temporal - 1]) / 2 / rate for i in range(0, len(padded), temporal)]


def seconds(video, processor, recipe: dict | None = None) -> list[float]:
    """group_seconds of a video as the collator decodes it (what the plan counts the time text by)."""
    indices, rate, _, _, _ = sampled(video, processor, recipe)
    return group_seconds(indices, rate, processor.video_processor.temporal_patch_size)


def video_tokens(video, processor, recipe: dict | None = None) -> int:
    """Merged tokens of one video after sampling (the recipe's fps / max_frames, else the processor's) and the
    per-frame resize."""
    from kit import families

    frames, width, height = probe(video, processor, recipe)
    vp = processor.video_processor
    factor = vp.patch_size * vp.merge_size
    width, height = families.of_processor(processor).video_frame_size(frames, width, height, processor)
    return math.ceil(frames / vp.temporal_patch_size) * (height // factor) * (width // factor)


def frames(video, processor) -> tuple[np.ndarray, dict]:
    """The sampled frames of one video as a (frames, height, width, 3) uint8 array, and the processor's
    metadata for them (which frames of how many, at what rate: Qwen3-VL writes each group's time from it)."""
    indices, rate, total, _, _ = sampled(video, processor)
    if isinstance(video, list):
        pictures = []
        for index in indices:
            with Image.open(video[index]) as frame:
                pictures.append(frame.convert("RGB"))
        size = pictures[0].size  # a video's frames share one size; a stray frame is fitted to the first
        array = np.stack([np.asarray(p if p.size == size else p.resize(size, Image.Resampling.BICUBIC))
                          for p in pictures])
        return array, _metadata(total, rate, indices, array)
    import av

    wanted, decoded = set(indices), {}
    with av.open(str(video)) as container:
        for index, frame in enumerate(container.decode(video=0)):
            if index in wanted:
                decoded[index] = frame.to_ndarray(format="rgb24")
            if len(decoded) == len(wanted):
                break
    if not decoded:
        raise BadVideo(f"{video}: no frame could be decoded")
    kept = [index for index in indices if index in decoded]  # a repeated last frame comes twice
    return np.stack([decoded[index] for index in kept]), _metadata(total, rate, kept, decoded[kept[0]][None])


def _metadata(total: int, rate: float, indices: list[int], array: np.ndarray) -> dict:
    return {"total_num_frames": total, "fps": rate, "frames_indices": indices, "duration": total / rate,
            "height": array.shape[1], "width": array.shape[2]}


def batch_videos(samples: list[dict], processor) -> dict:
    """The processor's video arguments for a batch: every video in row order (the processor fills the
    <|video_pad|> slots in that order) with its metadata; {} for a batch without videos."""
    decoded = [frames(video, processor) for sample in samples for video in sample.get("videos") or []]
    if not decoded:
        return {}
    return {"videos": [array for array, _ in decoded], "video_metadata": [meta for _, meta in decoded]}
