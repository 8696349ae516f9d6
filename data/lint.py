"""Find the rows that would break or silently weaken training, before any GPU time is spent.

    python -m data.lint jsonl:my_charts.jsonl
    python -m data.lint llamafactory:LLaMA-Factory/data#mllm_demo --recipe chartqa_2b
    python -m data.lint synthetic --set synthetic_num_train=500
    python -m data.lint --recipe chartqa            # the recipe's own dataset

Each finding names the source, the row and the problem. These checks need no model; train.py runs them at start
(and with --plan), together with the ones that need the model's processor (tokens over max_length,
kit/plan/estimate.py).
`--on-bad-row skip` drops the rows it reports and writes them to skipped.jsonl.
"""

import json
import re
import sys
import warnings
from pathlib import Path

import click
from PIL import Image

from data.formats import placeholder_count
from kit.errors import UserError

MAX_ASPECT_RATIO = 200  # the Qwen VL image processors refuse more extreme images
ROLES = ("system", "user", "assistant")
# Chat and vision markers are written <|name|> by every Qwen VL family (vision start/end, image and video pads, turn
# tokens): typed into a row's text, the processor reads them as image slots or turn boundaries (an <|image_pad|>
# without its image stops the processor deep inside a batch). The form, not one family's list, is what is refused.
SPECIAL_TOKEN = re.compile(r"<\|[^|<>\s]+\|>")
# What the kit trains: text, images and videos. Anything else in a row (an audio file, an <audio> marker, a part of
# another type, an image by URL) is a finding, the same whichever loader read the row: never dropped silently by
# the chat template, never left in the prompt as literal markup.
PART_TYPES = ("text", "image", "video")
UNUSED_MARKER = re.compile(r"<(audio|speech|sound)>")
URL = re.compile(r"^[a-z][a-z0-9+.-]*://", re.IGNORECASE)


def where(sample: dict, index: int) -> str:
    return sample.get("source") or f"row {index} ({sample.get('id', 'no id')})"


def _texts(message: dict) -> list[str]:
    content = message.get("content")
    if isinstance(content, str):
        return [content]
    return [part.get("text") or "" for part in content or [] if part.get("type") == "text"]


def image_problem(image) -> str | None:
    """Why an image cannot be used, or None. Decodes the whole file so truncation shows up here."""
    if isinstance(image, Image.Image):
        width, height = image.size
    elif isinstance(image, (dict, bytes)):  # encoded bytes of a Hugging Face row (data/hf.py)
        import io

        data = image.get("bytes") if isinstance(image, dict) else image
        if not data:
            return f"image has no bytes ({image.get('path') or 'no path'})"
        try:
            with Image.open(io.BytesIO(data)) as opened:
                opened.load()
                width, height = opened.size
        except Exception as error:  # PIL raises many types for corrupt files
            return f"image unreadable or truncated: {image.get('path') if isinstance(image, dict) else ''} ({error})"
    else:
        path = Path(image)
        if not path.exists():
            return f"image file not found: {path}"
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", Image.DecompressionBombWarning)
                with Image.open(path) as opened:
                    opened.load()
                    width, height = opened.size
            if any(issubclass(w.category, Image.DecompressionBombWarning) for w in caught):
                click.echo(f"note: {path} is {width}x{height} ({width * height / 1e6:.0f} Mpx), more than PIL's "
                           f"{Image.MAX_IMAGE_PIXELS / 1e6:.0f} Mpx decompression-bomb threshold: it is decoded "
                           "once and then read from a copy at the size the model sees", err=True)
                # named now: PIL's own warning for it, which names no file, would only repeat this
                warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
        except Image.DecompressionBombError:
            limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # only to read the size from the header
            try:
                with Image.open(path) as opened:
                    width, height = opened.size
            finally:
                Image.MAX_IMAGE_PIXELS = limit
            return (f"image is {width}x{height} ({width * height / 1e6:.0f} Mpx), over PIL's limit of "
                    f"{2 * limit / 1e6:.0f} Mpx (its guard against decompression bombs): {path}; downscale it, "
                    "e.g. to 4000 pixels on the long side")
        except Exception as error:  # PIL raises many types for corrupt files
            return f"image unreadable or truncated: {path} ({error})"
    if width == 0 or height == 0:
        return f"image has zero size ({width}x{height})"
    if max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
        return f"image aspect ratio {max(width, height) / min(width, height):.0f} is over {MAX_ASPECT_RATIO}"
    return None


def text_problems(messages: list[dict]) -> list[str]:
    """Text parts that are not text, or that hold markers the model would not read as the user meant."""
    problems = []
    for message in messages:
        content = message.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content or []
        for part in parts:
            if isinstance(part, dict) and part.get("type") not in PART_TYPES:
                problems.append(unknown_part(message.get("role"), part))
                continue
            if not isinstance(part, dict) or part.get("type") != "text":
                continue
            text = part.get("text")
            if not isinstance(text, str):
                problems.append(f"a {message.get('role')} text part is {json.dumps(text)}, not text")
                continue
            token = SPECIAL_TOKEN.search(text)
            if token:
                problems.append(f"{message.get('role')} text holds the special token {token.group()}; remove it "
                                "(an image goes in \"images\", placed by a {\"type\": \"image\"} part)")
            elif UNUSED_MARKER.search(text):
                marker = UNUSED_MARKER.search(text).group()
                problems.append(f"{message.get('role')} text holds {marker}: the kit trains text, images and "
                                f"videos, not {marker[1:-1]}; drop the row (--on-bad-row skip) or the marker and "
                                "its file")
            elif "<image>" in text or "<video>" in text:
                kind = "image" if "<image>" in text else "video"
                problems.append(f"{message.get('role')} text holds a LLaVA-style \"<{kind}>\" inside a list of parts, "
                                f"which Qwen reads as plain text; place the {kind} with a {{\"type\": \"{kind}\"}} "
                                f"part instead (a \"<{kind}>\" in plain-text content, LLaMA-Factory's way, is read)")
    return problems


def unknown_part(role, part: dict) -> str:
    """The finding for a content part the kit does not train (audio, an OpenAI-style image_url, any other type)."""
    kind = part.get("type")
    if kind == "image_url":
        return (f"a {role} image_url part (an image by URL): the kit reads local image files; download it and give "
                "a {\"type\": \"image\"} part with the file in \"images\"")
    return (f"a {role} part of type {json.dumps(kind)}: the kit trains text, image and video parts only; drop the "
            "row (--on-bad-row skip) or that part")


def url_problem(item, kind: str) -> str | None:
    """An image or video given by URL (the loaders keep a URL as written): the kit reads local files only."""
    if isinstance(item, str) and URL.match(item):
        return f"{kind} by URL ({item}): the kit reads local files and fetches nothing; download it and give its path"
    return None


def sample_problems(sample: dict) -> list[str]:
    if sample.get("problem"):  # the loader could not even read the row
        return [sample["problem"]]
    problems = []
    messages = sample.get("messages") or []
    for message in messages:
        if message.get("role") not in ROLES:
            problems.append(f"unknown role {message.get('role')!r} (expected one of {', '.join(ROLES)})")
    problems += text_problems(messages)
    answers = [m for m in messages if m.get("role") == "assistant"]
    if not answers or not "".join(_texts(answers[-1])).strip():
        problems.append("empty or missing assistant answer")
    images, videos = sample.get("images") or [], sample.get("videos") or []
    for kind, given in (("image", images), ("video", videos)):
        placeholders = placeholder_count(messages, kind)
        if placeholders != len(given) and (given or placeholders or kind == "image"):
            problems.append(f"{placeholders} {kind} placeholder(s) in the messages but {len(given)} {kind}(s)")
    for image in images:
        problem = url_problem(image, "image") or image_problem(image)
        if problem:
            problems.append(problem)
    for video in videos:
        problem = url_problem(video, "video") or video_problem(video)
        if problem:
            problems.append(problem)
    return problems


def video_problem(video) -> str | None:
    """Why a video (a file, or a list of frame files) cannot be used, or None. A file's container is opened
    and its first frame decoded (PyAV); every frame file is checked as an image."""
    if isinstance(video, list):
        if not video:
            return "video has no frames (an empty list)"
        return next((f"video frame {problem}" for problem in map(image_problem, video) if problem), None)
    path = Path(video)
    if not path.exists():
        return f"video file not found: {path}"
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                return f"video file has no video stream: {path}"
            next(container.decode(video=0))
    except StopIteration:
        return f"video file has no frames: {path}"
    except (av.FFmpegError, OSError) as error:
        return f"video unreadable: {path} ({error})"
    return None


def _row_key(sample: dict) -> str:
    """What makes two rows the same: all their media (images and videos, in order) and their messages."""
    images = [i if isinstance(i, str) else _image_digest(i) for i in sample.get("images") or []]
    return json.dumps([images, sample.get("videos") or [], sample.get("messages")], sort_keys=True, default=str)


def _image_digest(image) -> str:
    """Encoded bytes (a Hugging Face row's image) by content, so the same chart in two rows is a duplicate."""
    if isinstance(image, dict) and image.get("bytes"):
        import hashlib

        return hashlib.sha1(image["bytes"]).hexdigest()
    return f"<image {id(image)}>"


def lint(samples, duplicates: bool = True) -> list[tuple[int, str, str]]:
    """(index, where, problem) for every finding; exact duplicate rows too unless `duplicates` is off
    (a repeated question trains twice as hard, but scores fine in an evaluation)."""
    findings, seen = [], {}
    for index, sample in enumerate(samples):
        for problem in sample_problems(sample):
            findings.append((index, where(sample, index), problem))
        if not duplicates or sample.get("problem"):  # rows the loader could not read are all alike, not copies
            continue
        key = _row_key(sample)
        if key in seen:
            findings.append((index, where(sample, index), f"exact duplicate of {where(samples[seen[key]], seen[key])}"))
        else:
            seen[key] = index
    return findings


def skipped_rows(samples, findings) -> list[dict]:
    """The rows of skipped.jsonl: one per finding, naming where it is and what is wrong."""
    return [{"index": index, "where": place, "problem": problem, "id": samples[index].get("id")}
            for index, place, problem in findings]


def split_bad_rows(samples: list[dict], findings, on_bad_row: str, skipped_path: Path | None = None):
    """Keep the good rows; with on_bad_row=fail any finding is an error naming the rows."""
    if not findings:
        return samples
    lines = [f"  {place}: {problem}" for _, place, problem in findings]
    if on_bad_row == "fail":
        shown = "\n".join(lines[:20]) + (f"\n  ... and {len(lines) - 20} more" if len(lines) > 20 else "")
        raise UserError(f"{len(findings)} problem(s) in the data:\n{shown}\n"
                        "fix these rows, or pass --on-bad-row skip to go on without them (they are then listed "
                        "in skipped.jsonl)")
    bad = {index for index, _, _ in findings}
    click.echo(f"skipping {len(bad)} bad row(s) of {len(samples)}:")
    keep = [index for index in range(len(samples)) if index not in bad]
    click.echo("\n".join(lines[:20]) + (f"\n  ... and {len(lines) - 20} more" if len(lines) > 20 else ""))
    if skipped_path:
        skipped_path.parent.mkdir(parents=True, exist_ok=True)
        with skipped_path.open("w") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in skipped_rows(samples, findings))
        click.echo(f"skipped rows written to {skipped_path}")
    if hasattr(samples, "select"):  # lazy samples (data/hf.py): a view of the good rows, nothing loaded
        return samples.select(keep)
    return [samples[index] for index in keep]


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("source", required=False)
@click.option("--recipe", default="chartqa", show_default=True, help="Recipe whose data settings apply.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe key; repeatable.")
@click.option("--split", default="train", show_default=True, help="Which split to check.")
def main(source, recipe, overrides, split):
    """Check a dataset (chartqa | latex_ocr | synthetic | jsonl:PATH | hf:NAME | llamafactory:DIR#NAME) for rows
    that would break training.

    \b
    python -m data.lint jsonl:my_charts.jsonl
    python -m data.lint synthetic --set synthetic_num_train=500
    python -m data.lint --recipe chartqa            # the recipe's own dataset

    Tokens over max_length need the model's processor: python train.py --plan checks them too."""
    import data
    import recipes

    try:
        if source:
            overrides = [f"dataset={source}", *overrides]
        config, _ = recipes.load(recipe, overrides)
        samples = data.load(config, split)
    except (UserError, FileNotFoundError) as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(2)
    findings = lint(samples)
    for index, place, problem in findings:
        # a JSONL row already names its file and line
        click.echo(f"{place}: {problem}" if samples[index].get("source") else
                   f"{config['dataset']} {split} {place}: {problem}")
    click.echo(f"{len(samples)} rows checked, {len(findings)} problem(s)")
    sys.exit(1 if findings else 0)


if __name__ == "__main__":
    main()
