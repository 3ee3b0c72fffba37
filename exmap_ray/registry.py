"""Named registries (timm's @register_model, DomainBed's algorithm table) instead of if-chains."""
from __future__ import annotations

from typing import Callable, Generic, TypeVar

from .errors import SpecError, did_you_mean

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, spec_key: str):
        self.kind, self.spec_key = kind, spec_key
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} '{name}' registered twice")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        if name not in self._items:
            raise SpecError(f"spec key '{self.spec_key}': unknown {self.kind} '{name}'. "
                            f"Registered: {', '.join(sorted(self._items))}.{did_you_mean(name, self._items)}")
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items
