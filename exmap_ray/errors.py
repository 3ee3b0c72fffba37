"""User-facing errors.

Anything raised as a `UserError` is the user's to fix (a spec, a dataset, a
path): the CLI prints its message and exits 2, without a traceback.  Anything
else is a bug in exmap-ray and keeps its traceback.
"""


class UserError(Exception):
    """A problem in what the user gave us; the message says what and how to fix it."""


class SpecError(UserError):
    """A bad spec key, type or value. The message names the key path."""


class DataError(UserError):
    """A dataset that is missing, malformed or unusable. The message names the file or column."""
