"""The one error type a user can fix. Every user-facing error of the kit, data/ and recipes/ subclasses it, so
this module imports nothing of ours (it is layer 0); kit.cli.user_errors turns it into `error: ...` + exit 2."""


class UserError(Exception):
    """Anything the user can fix: the message says what happened, where, and what to do."""
