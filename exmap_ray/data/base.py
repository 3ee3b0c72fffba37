"""The dataset contract shared by every loader, and the one dataset registry.

Each dataset is one `DatasetEntry` in `DATASETS`: its builder, its own spec keys and, for a dataset on
disk, its layout scanner. Register a generated dataset with `@register_dataset(NAME, keys=...)` on its
builder, and an on-disk one with `@register_layout(NAME, keys=...)` on its scanner (layout.py): its
builder is then the shared image path over the scanned table (images.image_group_data, with the
val/test decode cache).

`keys` is a dataclass of the dataset's own keys, each made with `options.opt` (default, reason,
check): cmnist's rho and split sizes, an on-disk dataset's root (`layout.RootKeys`). They sit in the
spec's `dataset:` mapping beside the keys every dataset takes (spec.DatasetSpec), and are valid only
when `dataset.name` names this dataset.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from ..registry import Registry

if TYPE_CHECKING:
    from .layout import Scan


@dataclass(frozen=True)
class DatasetEntry:
    name: str
    build: Callable[..., "GroupData"]                      # (dspec, seed) -> GroupData
    scan: Optional[Callable[..., "Scan"]] = None           # (dspec) -> Scan: the on-disk index, no image decoded
    summary: str = ""                                      # one line for `exmap-ray datasets`
    keys: Optional[type] = None                            # a dataclass of its own spec keys (dataset.*)


DATASETS: Registry[DatasetEntry] = Registry("dataset", "dataset.name")


def _summary(fn: Callable) -> str:
    import sys

    return ((sys.modules[fn.__module__].__doc__ or "").strip().splitlines() or [""])[0]


def register_dataset(name: str, keys: Optional[type] = None) -> Callable:
    """`@register_dataset("cmnist", keys=CmnistKeys)` on a builder (dspec, seed) -> GroupData: a dataset
    made in memory, with the dataclass of its own spec keys."""
    def deco(build: Callable) -> Callable:
        DATASETS.register(name)(DatasetEntry(name, build, summary=_summary(build), keys=keys))
        return build
    return deco


@dataclass
class Split:
    images: Dataset          # item i -> float tensor (C, H, W); no labels, so nothing leaks
    y: np.ndarray            # class labels, int64
    group: np.ndarray        # true group, int64: evaluation only
    attrs: dict = field(default_factory=dict)  # name -> per-sample attribute array (e.g. UrbanCars 'bg'): evaluation only

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class GroupData:
    train: Split
    val: Split
    test: Split
    n_classes: int
    group_names: list[str]   # index = true group id
    # (pred, y, attrs) -> dict of extra test metrics (UrbanCars' shortcut gaps); evaluation only
    shortcut_metrics: Optional[Callable] = None

    @property
    def n_groups(self) -> int:
        return len(self.group_names)

    def split(self, name: str) -> Split:
        return {"train": self.train, "val": self.val, "test": self.test}[name]


class TensorImages(Dataset):
    """In-memory images (N, C, H, W) float32."""

    def __init__(self, x: torch.Tensor):
        self.x = x

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i]


class Labeled(Dataset):
    """Pairs images with class labels for training: (x, y)."""

    def __init__(self, split: Split):
        self.images, self.y = split.images, torch.as_tensor(split.y)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.images[i], self.y[i]


def loader_options(dspec, persistent: bool = True) -> dict:
    """DataLoader keyword arguments from the dataset spec: workers, pinned memory, persistent workers."""
    workers = dspec.loader_workers
    pin = torch.cuda.is_available() if dspec.pin_memory == "auto" else bool(dspec.pin_memory)
    opts = {"num_workers": workers, "pin_memory": pin}
    if workers > 0:
        opts["persistent_workers"] = bool(persistent and dspec.persistent_workers)
    return opts


def build_dataset(dspec, seed: int) -> GroupData:
    return DATASETS.get(dspec.name).build(dspec, seed)
