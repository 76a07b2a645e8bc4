"""User-facing errors.

A UserError is a problem with what the user gave us (a path, a file, data).
The CLI prints its message on one line and exits non-zero without a
traceback; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A one-line, user-facing error: say what is wrong and what was expected."""
