"""Named registries (timm's @register_model, DomainBed's algorithm table) instead of if-chains.

A registry sits beside what it registers (clustering.CLUSTERERS, retrain.RETRAINERS, ...) and is made
with the spec key that names its entries; `for_key` finds it by that key. This is how the spec checks
a name without importing any plugin (imports point down): `spec.from_dict` asks `for_key(path)` for each
key it reads, so a registry that has been imported checks its key. `exmap_ray.plugins` imports them all
(the CLI does, before it reads a spec).

A registry whose entries also declare spec keys (a retrainer's `retrain.<name>` section, a dataset's
own `dataset.*` keys) is needed before the spec can be built at all: `require` imports the plugins
then, by module name (`importlib`), so `spec` still imports no plugin module itself.
"""

from __future__ import annotations

import importlib
from typing import Callable, Generic, Optional, TypeVar

from .errors import SpecError, did_you_mean

T = TypeVar("T")
_BY_KEY: dict[str, "Registry"] = {}


class Registry(Generic[T]):
    """Entries by name. Every plugin registers the same way, with a decorator beside its code:

        @CLUSTERERS.register("spectral_split", keys=SpectralSplitKeys)
        def spectral_split_clusters(X, cspec, seed): ...

    `entry(name, obj, **meta)`, when the registry has one, makes what is stored from the decorated object
    and the decorator's keywords (a dataset's `DatasetEntry`, a retrainer's `FunctionRetrainer`); without
    it the object itself is stored. `keys`, where given, is the dataclass of the plugin's own spec keys
    (made with `options.opt`): the spec builds its section from them (spec.py), and the stage keys hash
    them (stages.py), so adding a plugin, or a key to one, touches that plugin's module alone."""

    def __init__(self, kind: str, spec_key: str, entry: Optional[Callable[..., T]] = None):
        if spec_key in _BY_KEY:
            raise ValueError(f"two registries for spec key '{spec_key}'")
        self.kind, self.spec_key, self._entry = kind, spec_key, entry
        self._items: dict[str, T] = {}
        self._keys: dict[str, type] = {}  # name -> the dataclass of its own spec keys
        self._unavailable: dict[str, str] = {}  # name -> why it is not registered here (e.g. a missing extra)
        _BY_KEY[spec_key] = self

    def register(self, name: str, keys: Optional[type] = None, unavailable: Optional[str] = None, **meta) -> Callable:
        """The one registration idiom: `@REGISTRY.register(NAME, keys=KeysDataclass, **meta)`; returns the
        decorated object unchanged. `unavailable="why"` (e.g. an optional extra is missing) keeps the name
        known without registering it: asking for it says why (see `unavailable`)."""
        if meta and self._entry is None:
            raise TypeError(f"{self.kind} registry takes no keywords besides keys; got {sorted(meta)}")

        def deco(obj):
            if unavailable is not None:
                self.unavailable(name, unavailable)
                return obj
            if name in self._items:
                raise ValueError(f"{self.kind} '{name}' registered twice")
            self._items[name] = self._entry(name, obj, keys=keys, **meta) if self._entry else obj
            declared = keys if keys is not None else getattr(self._items[name], "keys", None)  # an entry's default
            if isinstance(declared, type):
                self._keys[name] = declared
            return obj

        return deco

    def keys_of(self, name: str) -> Optional[type]:
        """The dataclass of entry `name`'s own spec keys, or None."""
        return self._keys.get(name)

    def unavailable(self, name: str, why: str) -> None:
        """Know `name` without registering it: asking for it raises a SpecError saying `why` (e.g. which
        optional extra installs it) instead of 'unknown'."""
        self._unavailable[name] = why

    def get(self, name: str) -> T:
        if name not in self._items and name in self._unavailable:
            raise SpecError(f"spec key '{self.spec_key}': {self.kind} '{name}' {self._unavailable[name]}")
        if name not in self._items:
            raise SpecError(
                f"spec key '{self.spec_key}': unknown {self.kind} '{name}'. "
                f"Registered: {', '.join(sorted(self._items))}.{did_you_mean(name, self._items)}"
            )
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items


def for_key(spec_key: str) -> Optional[Registry]:
    """The registry whose entries the dotted spec key names (e.g. 'clustering.method'), if imported."""
    return _BY_KEY.get(spec_key)


PLUGINS = "exmap_ray.plugins"  # the module that imports every module that registers something


def require(spec_key: str) -> Registry:
    """The registry for `spec_key`, importing the plugins first when it has not been imported yet."""
    if spec_key not in _BY_KEY:
        importlib.import_module(PLUGINS)
    if spec_key not in _BY_KEY:
        raise KeyError(f"no registry for spec key '{spec_key}' after importing {PLUGINS}")
    return _BY_KEY[spec_key]
