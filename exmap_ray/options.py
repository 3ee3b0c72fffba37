"""How a spec key is declared: `opt(default, why, check, search)`, and the value checks keys share.

The spec's own sections (spec.py) and the sections a plugin declares beside its code (a retrainer's
`retrain.<name>` keys, a dataset's own `dataset.*` keys) are plain dataclasses whose fields are made
with `opt`, so `exmap-ray spec` shows every key with its reason wherever it is declared. Imports
nothing of the project: a plugin declares its keys without importing the spec.

    @dataclass
    class GroupDROKeys:
        eta: float = opt(0.01, "step size of the group weights", positive,
                         search={"loguniform": [0.001, 1.0]})
"""

from __future__ import annotations

from dataclasses import MISSING, Field, field
from typing import Any, Optional


_UNSET = object()


def opt(
    default, why: str, check=None, search: Optional[dict] = None, *, neutral: Any = _UNSET, execution: bool = False
):
    """A spec field with its reason (`why`), an optional value check and an optional search range.

    `check(value)` returns None when the value is fine, or a phrase saying what is allowed.
    `search` is the key's default search domain ({grid: [...]}, {choice: [...]}, {uniform: [lo, hi]},
    {loguniform: [lo, hi]} or {randint: [lo, hi]}), which a sweep takes with `search.space: {KEY: default}`
    (DomainBed's hparams registry: the default and its search range next to the code that uses them).

    How stage keys (cache folders) see the key (stages.section_config):
    - `execution=True`: it changes how a stage runs, not what it computes (a batch size, a worker count),
      so no stage key hashes it;
    - `neutral=VALUE`: the value under which the key changes nothing, i.e. what the code did before the
      key existed. A stage key hashes the key only when its value differs, so adding a key never changes
      an existing cache key. Every key added since stage keys existed declares it (tests/test_stages.py
      checks this against `legacy.ALWAYS_HASHED`). Keep it when the default changes later: it records
      history, not the default.
    """
    meta = {"why": why, "check": check, "search": search, "execution": execution}
    if neutral is not _UNSET:
        meta["neutral"] = neutral
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def hashed(f: Field, value: Any) -> bool:
    """Whether a stage key hashes field `f` at `value` (see `opt`: execution keys never, a key with a
    neutral value only away from it)."""
    if f.metadata.get("execution"):
        return False
    return not ("neutral" in f.metadata and value == f.metadata["neutral"])


def default_of(f: Field) -> Any:
    """A dataclass field's default value (its factory's, for lists and mappings)."""
    return f.default if f.default is not MISSING else f.default_factory()


def positive(v):
    return None if v > 0 else "a number > 0"


def non_negative(v):
    return None if v >= 0 else "a number >= 0"


def fraction(v):
    return None if 0.0 <= v <= 1.0 else "a number in [0, 1]"


def positive_list(v):
    return None if v and all(x > 0 for x in v) else "a non-empty list of numbers > 0"


def non_negative_list(v):
    return None if v and all(x >= 0 for x in v) else "a non-empty list of numbers >= 0"
