"""The dataset contract shared by every loader, and the one dataset registry.

Each dataset is one `DatasetEntry` in `DATASETS`: its builder, its own spec keys and, for a dataset on
disk, its layout scanner. Register a generated dataset with `@DATASETS.register(NAME, keys=...)` on its
builder, and an on-disk one with `@DATASETS.register(NAME, keys=..., on_disk=True)` on its scanner
(layout.py): its builder is then the shared image path over the scanned table (images.image_group_data,
with the val/test decode cache).

`keys` is a dataclass of the dataset's own keys, each made with `options.opt` (default, reason,
check): cmnist's rho and split sizes, an on-disk dataset's root (`RootKeys`). They sit in the
spec's `dataset:` mapping beside the keys every dataset takes (spec.DatasetSpec), and are valid only
when `dataset.name` names this dataset.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from ..options import opt
from ..registry import Registry

if TYPE_CHECKING:
    from .layout import Scan


@dataclass(frozen=True)
class DatasetEntry:
    name: str
    build: Optional[Callable[..., "GroupData"]] = None  # (dspec, seed) -> GroupData: a dataset made in memory
    scan: Optional[Callable[..., "Scan"]] = None  # (dspec) -> Scan: an on-disk index, no image decoded
    summary: str = ""  # one line for `exmap-ray datasets`
    keys: Optional[type] = None  # a dataclass of its own spec keys (dataset.*)
    transforms: Any = None  # on disk: images.PAPER (None) or images.RESIZE


@dataclass
class RootKeys:
    """The key every dataset on disk takes; a dataset with more declares a subclass (celeba, urbancars)."""

    root: Optional[str] = opt(None, "the dataset folder; `exmap-ray datasets check NAME --root PATH` verifies it")


def _summary(fn: Callable) -> str:
    import sys

    return ((sys.modules[fn.__module__].__doc__ or "").strip().splitlines() or [""])[0]


def _entry(
    name: str,
    fn: Callable,
    keys: Optional[type] = None,
    on_disk: bool = False,
    transforms: Any = None,
    summary: Optional[str] = None,
) -> DatasetEntry:
    summary = summary or _summary(fn)  # default: the first line of the module's docstring
    if on_disk:
        return DatasetEntry(name, scan=fn, summary=summary, keys=keys or RootKeys, transforms=transforms)
    return DatasetEntry(name, build=fn, summary=summary, keys=keys)


DATASETS: Registry[DatasetEntry] = Registry("dataset", "dataset.name", entry=_entry)
"""Made in memory: `@DATASETS.register(NAME, keys=...)` on a builder (dspec, seed) -> GroupData. On disk:
`@DATASETS.register(NAME, keys=..., on_disk=True)` on a scanner (dspec) -> Scan (layout.py); its builder
is the shared image path over the scanned table (`transforms`: images.PAPER by default, or images.RESIZE)."""


@dataclass
class Split:
    images: Dataset  # item i -> float tensor (C, H, W); no labels, so nothing leaks
    y: np.ndarray  # class labels, int64
    group: np.ndarray  # true group, int64: evaluation only
    # name -> per-sample attribute array (e.g. UrbanCars 'bg'): evaluation only
    attrs: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class GroupData:
    train: Split
    val: Split
    test: Split
    n_classes: int
    group_names: list[str]  # index = true group id
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


def loader_options(dspec, persistent: bool = True, device: str | None = None) -> dict:
    """DataLoader keyword arguments from the dataset spec: workers, pinned memory, persistent workers.

    pin_memory 'auto' pins when the batches go to a CUDA `device` (the stage's, `resources.stage_device`);
    without a device given, when this process sees CUDA (library use)."""
    workers = dspec.loader_workers
    if dspec.pin_memory != "auto":
        pin = bool(dspec.pin_memory)
    else:
        pin = str(device).startswith("cuda") if device is not None else torch.cuda.is_available()
    opts = {"num_workers": workers, "pin_memory": pin}
    if workers > 0:
        opts["persistent_workers"] = bool(persistent and dspec.persistent_workers)
    return opts
