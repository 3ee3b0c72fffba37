"""The dataset contract shared by every loader."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from ..registry import Registry

DATASETS: Registry = Registry("dataset", "dataset.name")


@dataclass
class Split:
    images: Dataset          # item i -> float tensor (C, H, W); no labels, so nothing leaks
    y: np.ndarray            # class labels, int64
    group: np.ndarray        # true group, int64: evaluation only

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class GroupData:
    train: Split
    val: Split
    test: Split
    n_classes: int
    group_names: list[str]   # index = true group id

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


def build_dataset(dspec, seed: int) -> GroupData:
    return DATASETS.get(dspec.name)(dspec, seed)
