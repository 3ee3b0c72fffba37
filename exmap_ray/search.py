"""The spec's `search:` section: a validated search space over any spec key.

    search:
      space:
        clustering.k: {grid: [2, 3, 4, 6, 8, auto]}
        clustering.scope: {grid: [local, global]}
        retrain.dfr.c_grid: {choice: [[1.0, 0.1], [0.3, 0.03]]}
        retrain.groupdro.eta: default        # the range declared with the key (`exmap-ray spec`)
        erm.lr: {loguniform: [1.0e-4, 1.0e-2]}

Every key must be a key of this spec (a retrainer's section retrain.<name>, the chosen dataset's own
keys), and every value it can take is checked against the spec's own types and ranges before any
trial starts, so a typo fails at once; a key that has moved names its new place. `default` takes the
search range declared with the key (`opt(..., search=...)`, beside the code that uses it).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

from .errors import SpecError, did_you_mean
from .spec import MOVED, Spec, _deep_merge, flatten, from_dict, moved_message

KINDS = {"grid": "list", "choice": "list", "uniform": "range", "loguniform": "range", "randint": "range"}
SCALARS = (str, int, float, bool, type(None))


@dataclass(frozen=True)
class Domain:
    key: str
    kind: str
    values: tuple

    @property
    def tune_key(self) -> str:
        """The key in Tune's config (and trial folder names): dots would read as nesting there."""
        return self.key.replace(".", "__")

    @property
    def encoded(self) -> bool:
        """A choice among lists or mappings (e.g. DFR C grids) travels through Tune as JSON strings:
        Optuna's categorical parameters hold scalars only. `decode` turns them back into values."""
        return self.kind == "choice" and not all(isinstance(v, SCALARS) for v in self.values)

    def tune(self):
        from ray import tune

        if self.kind == "grid":
            return tune.grid_search(list(self.values))
        if self.kind == "choice":
            return tune.choice([json.dumps(v) for v in self.values] if self.encoded else list(self.values))
        lo, hi = self.values
        return {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}[self.kind](lo, hi)

    def decode(self, value):
        """The spec value behind what Tune handed a trial."""
        return json.loads(value) if self.encoded and isinstance(value, str) else value


def unflatten(flat: dict[str, Any]) -> dict:
    out: dict = {}
    for key, value in flat.items():
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def spec_keys(spec: Spec | None = None) -> list[str]:
    """The dotted keys of `spec` (the defaults' when None) a sweep may search."""
    return [k for k in flatten((spec or Spec()).to_dict()) if not k.startswith("search.")]


def declared_range(spec: Spec, key: str):
    """The search domain declared with spec key `key` (its `opt(..., search=...)`), or None."""
    node, *path = key.split(".")
    obj = spec
    for part in [node, *path][:-1]:
        obj = getattr(obj, part)
    if not dataclasses.is_dataclass(obj):
        return None
    f = {f.name: f for f in dataclasses.fields(obj)}.get(key.rsplit(".", 1)[-1])
    return f.metadata.get("search") if f is not None else None


def flatten_space(space: dict, prefix: str = "", spec: Spec | None = None) -> dict:
    """Dotted keys down to each spec key's domain, so `--set search.space.clustering.k={grid: [2]}`
    (nested) and a YAML key `clustering.k:` (dotted) mean the same."""
    out, leaves = {}, set(spec_keys(spec)) | {k for k in MOVED if not any(m.startswith(k + ".") for m in MOVED)}
    for k, v in space.items():
        key = f"{prefix}{k}"
        domain = isinstance(v, dict) and len(v) == 1 and next(iter(v)) in KINDS
        if key not in leaves and isinstance(v, dict) and not domain:
            out.update(flatten_space(v, key + ".", spec))
        else:
            out[key] = v
    return out


def parse_space(spec: Spec) -> list[Domain]:
    space = flatten_space(spec.search.space, spec=spec)
    if not space:
        raise SpecError(
            "spec key 'search.space' is empty: name at least one spec key to search, e.g. "
            "search.space: {clustering.k: {grid: [2, 4, auto]}}"
        )
    valid = spec_keys(spec)
    base = {k: v for k, v in spec.to_dict().items() if k != "search"}
    domains = []
    for key, dom in space.items():
        where = f"search.space.{key}"
        if key not in valid and key in MOVED:
            raise SpecError(f"spec key '{where}': {moved_message(key)}")
        if key in valid and dom == "default":
            dom = declared_range(spec, key)
            if dom is None:
                raise SpecError(
                    f"spec key '{where}': 'default' takes the search range declared with the key, "
                    f"but '{key}' declares none (`exmap-ray spec` shows those that do); give a "
                    f"domain such as {{grid: [...]}}"
                )
        if key not in valid:  # the spec's own error when it says more (another dataset's key), else a near key
            values = next(iter(dom.values())) if isinstance(dom, dict) and len(dom) == 1 else None
            try:
                from_dict(
                    _deep_merge(base, unflatten({key: values[0] if isinstance(values, list) and values else None}))
                )
            except SpecError as e:
                if not str(e).startswith("unknown spec key"):
                    raise SpecError(f"spec key '{where}': {e}") from None
            raise SpecError(
                f"spec key '{where}': '{key}' is not a spec key.{did_you_mean(key, valid)} See `exmap-ray spec`"
            )
        if not isinstance(dom, dict) or len(dom) != 1 or next(iter(dom)) not in KINDS:
            raise SpecError(
                f"spec key '{where}': expected one of {{grid: [...]}}, {{choice: [...]}}, "
                f"{{uniform: [lo, hi]}}, {{loguniform: [lo, hi]}}, {{randint: [lo, hi]}}; got {dom!r}"
            )
        kind, values = next(iter(dom.items()))
        if not isinstance(values, list) or not values:
            raise SpecError(f"spec key '{where}.{kind}': expected a non-empty list, got {values!r}")
        if KINDS[kind] == "range":
            if len(values) != 2 or not all(isinstance(v, (int, float)) for v in values) or values[0] >= values[1]:
                raise SpecError(f"spec key '{where}.{kind}': expected [lo, hi] with lo < hi, got {values!r}")
            if kind == "loguniform" and values[0] <= 0:
                raise SpecError(f"spec key '{where}.loguniform': bounds must be > 0, got {values!r}")
        for v in values:  # each value (or range end) must make a valid spec on its own
            try:
                from_dict(_deep_merge(base, unflatten({key: v})))
            except SpecError as e:
                raise SpecError(f"spec key '{where}': value {v!r} is not valid: {e}") from None
        if kind == "grid" and spec.search.algorithm != "basic":
            raise SpecError(
                f"spec key '{where}.grid': search.algorithm '{spec.search.algorithm}' samples "
                f"each trial's values and cannot enumerate a grid; use {{choice: {values!r}}} "
                f"(search.num_samples sets how many trials), or search.algorithm: basic"
            )
        domains.append(Domain(key, kind, tuple(values)))
    return domains


def n_trials(domains: list[Domain], num_samples: int) -> int:
    """Trials a basic search runs: the grid's size times num_samples."""
    return num_samples * math.prod(len(d.values) for d in domains if d.kind == "grid")
