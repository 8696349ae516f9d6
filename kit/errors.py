"""Mistakes a user can make end in one line on stderr and exit code 2, never a traceback from a library."""

import contextlib
import sys


class UserError(Exception):
    """Anything the user can fix: the message says what happened, where, and what to do."""


@contextlib.contextmanager
def user_errors(*extra_types):
    """Turn the kit's own error types (and `extra_types`) into `error: ...` + exit 2."""
    from data.hub import HubUnavailable
    from data.jsonl import BadRow
    from kit.backend import BackendError
    from kit.chat import BadSample, SampleTooLong
    from recipes import RecipeError

    try:
        yield
    except (UserError, RecipeError, BackendError, BadSample, SampleTooLong, BadRow, FileNotFoundError,
            HubUnavailable, *extra_types) as error:
        from kit.distributed import report_error

        report_error(f"error: {error}")  # under torchrun: one line, not one per rank
        sys.exit(2)
