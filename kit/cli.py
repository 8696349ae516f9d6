"""What the scripts share at the command line: --help with the examples, errors as one line, and reading a user's
JSONL file."""

import contextlib
import json
import sys
from pathlib import Path

from kit.errors import UserError


@contextlib.contextmanager
def user_errors(*extra_types):
    """A UserError (every error type the kit, data/ and recipes/ raise for the user subclasses it), a missing file,
    or one of `extra_types` becomes `error: ...` on stderr and exit code 2."""
    try:
        yield
    except (UserError, FileNotFoundError, *extra_types) as error:
        from kit.train.distributed import report_error

        report_error(f"error: {error}")  # under torchrun: one line, not one per rank
        sys.exit(2)


def help_with_examples(summary: str, module_doc: str) -> str:
    """A script's module docstring (its commands and notes) under the one-line summary, laid out as written
    (click would otherwise re-flow the example commands into one paragraph)."""
    paragraphs = [p.strip("\n") for p in (module_doc or "").strip().split("\n\n")[1:] if p.strip()]
    return "\n\n".join([summary.strip(), *("\b\n" + p for p in paragraphs)])


def jsonl_rows(path: Path, option: str):
    """(line, where, row) for each non-blank line of a JSONL file the user named with `option`; a missing file, text
    that is not UTF-8, or a line that is not a JSON object is one UserError naming the file and line."""
    if not path.is_file():
        raise UserError(f"{option} {path}: no such file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise UserError(f"{option} {path}: not UTF-8 text (byte {error.start}); save it as UTF-8") from None
    for line, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        where = f"{path}:{line}"
        try:
            row = json.loads(text)
        except json.JSONDecodeError as error:
            raise UserError(f"{where}: not valid JSON ({error.msg} at column {error.colno})") from None
        if not isinstance(row, dict):
            raise UserError(f"{where}: a row must be a JSON object")
        yield line, where, row
