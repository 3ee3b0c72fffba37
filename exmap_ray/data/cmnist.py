"""Colored MNIST from real MNIST digits, with a colour shortcut of strength rho.

    exmap-ray run cmnist --set dataset.rho=0.98

- y = digit >= 5.
- Each digit is drawn into the red (colour 0) or green (colour 1) channel of a
  3x28x28 image. On train and val the colour equals y with probability rho;
  on test it is independent of y (rho = 0.5).
- The minority count per (split, class) is exactly round(n_class * (1 - rho)),
  at least 1 when rho < 1, so every (y, colour) group has members in every
  split and seeds differ only in which digits land where, not in group sizes.
- True group = 2*y + colour: 0 (<5, red), 1 (<5, green), 2 (>=5, red), 3 (>=5, green).

The 10,000 MNIST test digits ship inside the package and are verified against
MD5SUMS. `dataset.mnist_root` points at the full MNIST in torchvision's raw
layout (`ROOT/MNIST/raw/*-ubyte[.gz]`) for larger splits.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DataError, SpecError
from ..hashing import stage_seed
from ..options import fraction, opt, positive
from .base import DATASETS, GroupData, Split, TensorImages

log = logging.getLogger(__name__)

SHIPPED = Path(__file__).parent / "mnist"


@dataclass
class CmnistKeys:
    """cmnist's own spec keys (dataset.*); cmnist_multi adds its patch's."""

    rho: float = opt(
        0.99,
        "P(colour agrees with y) on train and val; 0.99 as the reference, weaker shortcuts "
        "(0.95) leave ERM's worst group unreliable at this size",
        fraction,
    )
    n_train: int = opt(5000, "training images", positive)
    n_val: int = opt(
        3000,
        "validation images; ExMap clusters these, so the minority needs enough members "
        "(about 15 per class at rho 0.99)",
        positive,
    )
    n_test: int = opt(2000, "test images (colour independent of y)", positive)
    mnist_root: Optional[str] = opt(
        None,
        "a folder with the full MNIST in torchvision's raw layout; None uses "
        "the 10k test digits shipped with exmap-ray",
    )


RAW_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "t10k": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
GROUP_NAMES = ["y<5 red", "y<5 green", "y>=5 red", "y>=5 green"]


def _read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (MNIST's format), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"MNIST file '{path}' cannot be read: {e}") from None
    magic = int.from_bytes(data[0:4], "big")
    ndim = magic & 0xFF
    if magic >> 8 != 0x08 or ndim not in (1, 3):
        raise DataError(f"MNIST file '{path}' is not an IDX uint8 file (magic {magic:#x})")
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise DataError(f"MNIST file '{path}' is truncated: {arr.size} values for shape {dims}")
    return arr.reshape(dims)


def _verify_shipped() -> None:
    sums = dict(line.split()[::-1] for line in (SHIPPED / "MD5SUMS").read_text().splitlines() if line.strip())
    for name, want in sums.items():
        got = hashlib.md5((SHIPPED / name).read_bytes()).hexdigest()
        if got != want:
            raise DataError(
                f"shipped MNIST file '{SHIPPED / name}' fails its checksum "
                f"(md5 {got}, MD5SUMS says {want}); reinstall exmap-ray"
            )


def _find_raw(root: Path, stem: str) -> Path | None:
    for folder in (root / "MNIST" / "raw", root / "raw", root):
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
    return None


def load_digits(mnist_root: str | None) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 28, 28), labels int64 (N,)) from the shipped test set or a user folder."""
    if mnist_root is None:
        _verify_shipped()
        return (
            _read_idx(SHIPPED / "t10k-images-idx3-ubyte.gz"),
            _read_idx(SHIPPED / "t10k-labels-idx1-ubyte.gz").astype(np.int64),
        )
    root = Path(mnist_root).expanduser()
    if not root.is_dir():
        raise DataError(
            f"dataset.mnist_root '{root}' is not a folder; expected torchvision's raw "
            f"layout ROOT/MNIST/raw/train-images-idx3-ubyte[.gz], or null for the shipped digits"
        )
    images, labels = [], []
    for part, (img_stem, lab_stem) in RAW_FILES.items():
        img, lab = _find_raw(root, img_stem), _find_raw(root, lab_stem)
        if img is None or lab is None:
            missing = img_stem if img is None else lab_stem
            raise DataError(
                f"dataset.mnist_root: '{missing}[.gz]' not found under '{root}' "
                f"(looked in MNIST/raw/, raw/ and the folder itself)"
            )
        x, y = _read_idx(img), _read_idx(lab)
        if len(x) != len(y):
            raise DataError(f"MNIST {part}: {len(x)} images but {len(y)} labels in '{img.parent}'")
        images.append(x)
        labels.append(y.astype(np.int64))
    return np.concatenate(images), np.concatenate(labels)


def colorize(digits: np.ndarray, colour: np.ndarray) -> torch.Tensor:
    """(N, 28, 28) uint8 + colour in {0 red, 1 green} -> (N, 3, 28, 28) float in [0, 1]."""
    x = torch.zeros(len(digits), 3, *digits.shape[1:], dtype=torch.float32)
    x[torch.arange(len(digits)), torch.as_tensor(colour)] = torch.as_tensor(digits, dtype=torch.float32) / 255.0
    return x


def assign_colours(y: np.ndarray, rho: float, rng: np.random.Generator) -> np.ndarray:
    """Colour = y except for exactly round(n_c * (1 - rho)) random members of each class c."""
    colour = y.copy()
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        n_min = int(round(len(idx) * (1 - rho)))
        if rho < 1:
            n_min = max(n_min, 1)
        flip = rng.choice(idx, size=min(n_min, len(idx)), replace=False)
        colour[flip] = 1 - c
    return colour


def split_sizes(dspec, n_digits: int) -> dict[str, int]:
    sizes = {"train": dspec.n_train, "val": dspec.n_val, "test": dspec.n_test}
    if sum(sizes.values()) > n_digits:
        raise SpecError(
            f"spec keys 'dataset.n_train' + 'dataset.n_val' + 'dataset.n_test' = "
            f"{sum(sizes.values())}, but only {n_digits} MNIST digits are available; "
            f"lower them or set dataset.mnist_root to the full MNIST"
        )
    return sizes


def to_input(x: torch.Tensor, dspec) -> torch.Tensor:
    """Resize to dataset.image_size and normalise with dataset.mean/std where the spec asks for it."""
    if dspec.image_size and dspec.image_size != x.shape[-1]:
        x = F.interpolate(x, size=dspec.image_size, mode="bilinear", align_corners=False)
    if dspec.mean is not None or dspec.std is not None:
        mean = torch.tensor(dspec.mean or [0.0] * 3).view(1, 3, 1, 1)
        std = torch.tensor(dspec.std or [1.0] * 3).view(1, 3, 1, 1)
        x = (x - mean) / std
    return x


def digit_splits(dspec, seed: int, tag: str):
    """Yield (split name, digits, y = digit >= 5, rng) for train, val and test, in that order.

    One generator per dataset (seeded by `tag`) draws the split order and then, between the
    yields, whatever the caller draws per split (colours, patches), so every C-MNIST variant
    gets reproducible, disjoint splits from the same digits.
    """
    digits, labels = load_digits(dspec.mnist_root)
    sizes = split_sizes(dspec, len(digits))
    rng = np.random.default_rng(stage_seed(seed, tag))
    order = rng.permutation(len(digits))
    start = 0
    for name, n in sizes.items():
        idx = order[start : start + n]
        start += n
        yield name, digits[idx], (labels[idx] >= 5).astype(np.int64), rng


@DATASETS.register("cmnist", keys=CmnistKeys)
def build_cmnist(dspec, seed: int) -> GroupData:
    splits = {}
    for name, digits, y, rng in digit_splits(dspec, seed, "cmnist"):
        colour = assign_colours(y, dspec.rho if name != "test" else 0.5, rng)
        x = to_input(colorize(digits, colour), dspec)
        splits[name] = Split(images=TensorImages(x), y=y, group=2 * y + colour)
    return GroupData(**splits, n_classes=2, group_names=list(GROUP_NAMES))
