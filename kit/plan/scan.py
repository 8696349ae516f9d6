"""Passes over every row of a data set, done once and cached: what preflight needs to know about each row.

`check_rows` runs data/lint.py's row checks (the full decode of every image included) with the image sizes
and a content digest for duplicates; it fans out over the CPU cores, shows rows/s, and is cached by the data
set's fingerprint and lint's source. `text_tokens` counts each row's text tokens, cached by the fingerprint,
the system prompt and the tokenizer. A second `--plan`, or a resumed run, reads both from the cache.

Samples without a `fingerprint` (a list built in code) are checked every time.
"""

import hashlib
import json
import os
from pathlib import Path

from kit.paths import write_json

CHUNK = 256  # rows per task: small enough for a smooth progress bar, large enough to amortise a task
POOL_FROM = 2000  # fewer rows than this are checked in this process: starting workers costs ~2 s
_memo: dict = {}  # id(samples) -> check_rows result, for samples with no fingerprint


def _cache_file(kind: str, key: str) -> Path:
    from kit.paths import cache_dir

    folder = cache_dir() / "preflight"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{kind}-{hashlib.sha1(key.encode()).hexdigest()[:20]}.json"


def _read(path: Path | None):
    if path is None or not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # a damaged cache entry is recomputed


def _write(path: Path | None, value):
    if path is not None:
        write_json(path, value)


def _lint_version() -> str:
    """The checks' code (lint's and this file's): a change to either makes the cached rows stale."""
    import data.lint

    code = Path(data.lint.__file__).read_bytes() + Path(__file__).read_bytes()
    return hashlib.sha1(code).hexdigest()[:12]


def _size(image):
    from kit.inputs.chat import image_size

    try:
        return list(image_size(image))  # header only
    except Exception:  # the row check reports it; no size to count
        return None


def check_chunk(samples, start: int) -> list:
    """[problems, where, image sizes, digest] per row of `samples` (rows start.. of the whole set)."""
    from data.lint import _row_key, sample_problems, where

    out = []
    for offset, sample in enumerate(samples):
        problems = sample_problems(sample)
        out.append([problems, where(sample, start + offset) if problems else None,
                    [_size(image) for image in sample.get("images") or []],
                    # rows the loader could not read are all alike, not copies (as in lint())
                    None if sample.get("problem") else hashlib.sha1(_row_key(sample).encode()).hexdigest()[:20]])
    return out


def _workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return os.cpu_count() or 1


def check_rows(samples, progress: bool = True, desc: str = "checking rows") -> list:
    """check_chunk's result for every row, from the cache when this data set was checked before."""
    from tqdm import tqdm

    fingerprint = getattr(samples, "fingerprint", None)
    path = _cache_file("rows", f"{fingerprint}|{_lint_version()}") if fingerprint else None
    cached = _read(path) if path else _memo.get(id(samples), (None, None))[1]
    if cached is not None and len(cached) == len(samples):
        return cached
    rows = [None] * len(samples)
    bar = tqdm(total=len(samples), desc=desc, unit="row", disable=not progress, mininterval=1)
    workers = _workers()
    if len(samples) < POOL_FROM or workers == 1:
        for start in range(0, len(samples), CHUNK):
            rows[start:start + CHUNK] = check_chunk(samples[start:start + CHUNK], start)
            bar.update(min(CHUNK, len(samples) - start))
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        # spawn, not fork: the parent may hold torch threads; each task gets a view of its rows (lazy samples
        # pickle as a reference to the memory-mapped file), maps it, decodes, and lets it go.
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(check_chunk, samples[start:start + CHUNK], start): start
                       for start in range(0, len(samples), CHUNK)}
            for future in as_completed(futures):
                start = futures[future]
                result = future.result()
                rows[start:start + len(result)] = result
                bar.update(len(result))
    bar.close()
    if path:
        _write(path, rows)
    else:
        _memo.clear()
        _memo[id(samples)] = (samples, rows)  # the samples are kept so their id is not reused
    return rows


def findings(samples, rows, duplicates: bool = True) -> list[tuple[int, str, str]]:
    """lint()'s findings (index, where, problem), in its order, from check_rows' result."""
    from data.lint import where

    found, seen = [], {}
    for index, (problems, place, _, digest) in enumerate(rows):
        for problem in problems:
            found.append((index, place, problem))
        if not duplicates or digest is None:
            continue
        if digest in seen:
            first = seen[digest]
            found.append((index, where(samples[index], index),
                          f"exact duplicate of {where(samples[first], first)}"))
        else:
            seen[digest] = index
    return found


def text_tokens(samples, indices: list[int], processor, system_prompt: str, progress: bool = True) -> list[int]:
    """Text tokens of each row in `indices` as the collator will see them (an image placeholder counts as
    image, not text). Image pixels are never read."""
    from tqdm import tqdm

    from kit import families
    from kit.inputs.chat import with_system

    tokenizer, family = processor.tokenizer, families.of_processor(processor)
    fingerprint = getattr(samples, "fingerprint", None)
    template = f"{processor.chat_template}|{sorted(family.chat_template_kwargs.items())}"
    identity = (tokenizer.name_or_path, len(tokenizer), hashlib.sha1(template.encode()).hexdigest())
    path = _cache_file("text", f"{fingerprint}|{system_prompt}|{identity}|{len(indices)}") if fingerprint else None
    cached = _read(path)
    if cached is not None and len(cached) == len(indices):
        return cached
    view = samples.without_images() if hasattr(samples, "without_images") else samples
    view = view.select(indices) if hasattr(view, "select") else [view[i] for i in indices]
    counts = []
    with tqdm(total=len(indices), desc="counting tokens", unit="row", disable=not progress, mininterval=1) as bar:
        batch = []
        for sample in view:
            batch.append(sample)
            if len(batch) == CHUNK or len(counts) + len(batch) == len(indices):
                texts = [family.chat_text(processor, with_system(s["messages"], system_prompt)) for s in batch]
                ids = tokenizer(texts)["input_ids"]
                # each image's and video's one placeholder token counts as vision, not text
                counts += [len(i) - len(s["images"]) - len(s.get("videos") or []) for i, s in zip(ids, batch)]
                bar.update(len(batch))
                batch = []
    _write(path, counts)
    return counts
