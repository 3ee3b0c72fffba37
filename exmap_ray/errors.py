"""User-facing errors.

Anything raised as a `UserError` is the user's to fix (a spec, a dataset, a
path): the CLI prints its message and exits 2, without a traceback.  Anything
else is a bug in exmap-ray and keeps its traceback.

`near_names` / `near_name` / `did_you_mean` are the one place that finds the name
a user most likely meant (a typo in a key, a registry name, a spec, a file or a
column), so every "not found, did you mean" message picks it the same way.
"""

from __future__ import annotations

import difflib
from typing import Iterable, Optional


class UserError(Exception):
    """A problem in what the user gave us; the message says what and how to fix it."""


class Fenced(RuntimeError):
    """A trial of a sweep whose folder another driver (a `--resume`) has claimed since it started (fence.py).
    An MLflow run it ends is marked KILLED."""


class SpecError(UserError):
    """A bad spec key, type or value. The message names the key path."""


class DataError(UserError):
    """A dataset that is missing, malformed or unusable. The message names the file or column."""


def near_names(name, candidates: Iterable, n: int = 1) -> list[str]:
    """Up to `n` of `candidates` nearest to `name`, nearest first: the same name in another case, then
    difflib's close matches (similarity >= 0.6, its default)."""
    cands = [str(c) for c in candidates]
    name = str(name)
    same = [c for c in cands if c.lower() == name.lower()]
    return list(dict.fromkeys(same + difflib.get_close_matches(name, cands, n=n)))[:n]


def near_name(name, candidates: Iterable) -> Optional[str]:
    """The candidate nearest to `name`, or None when none is near."""
    hit = near_names(name, candidates)
    return hit[0] if hit else None


def did_you_mean(name, candidates: Iterable) -> str:
    """ " Did you mean 'X'?" for the candidate nearest to `name`, or "" when none is near."""
    near = near_name(name, candidates)
    return f" Did you mean '{near}'?" if near else ""
