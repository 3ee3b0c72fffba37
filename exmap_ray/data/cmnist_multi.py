"""C-MNIST with two shortcuts: the colour of the digit and a corner patch.

    exmap-ray run cmnist_multi
    exmap-ray bench cmnist_multi --seeds 3

As `cmnist` (y = digit >= 5; colour = red/green channel agreeing with y with
probability `dataset.rho` on train and val), plus a white 4x4 patch in the
top-left (patch 0) or bottom-right (patch 1) corner that agrees with y with
its own probability `dataset.rho_patch`, drawn independently of the colour
(an exact share within each (class, colour) cell, at least 2 per cell). On
test both are independent of y.

True group = 4*y + 2*colour + patch: eight groups. Besides WGA, the test metrics
include the per-shortcut gaps, as UrbanCars reports them: the accuracy on test
images where only the colour (only the patch, both) disagrees with y, minus the
accuracy where both agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..metrics import shortcut_gaps
from ..options import fraction, opt
from .base import DATASETS, GroupData, Split, TensorImages
from .cmnist import CmnistKeys, assign_colours, colorize, digit_splits, to_input

PATCH = 4


@dataclass
class CmnistMultiKeys(CmnistKeys):
    """cmnist's keys and the patch's."""

    rho_patch: float = opt(
        0.9,
        "P(corner patch position agrees with y) on train and val, the second "
        "shortcut; drawn independently of the colour",
        fraction,
    )


def add_patch(x: torch.Tensor, patch: np.ndarray) -> torch.Tensor:
    """White PATCHxPATCH square, all channels: top-left for patch 0, bottom-right for patch 1."""
    x = x.clone()
    tl, br = np.flatnonzero(patch == 0), np.flatnonzero(patch == 1)
    x[tl, :, :PATCH, :PATCH] = 1.0
    x[br, :, -PATCH:, -PATCH:] = 1.0
    return x


def assign_patches(y: np.ndarray, colour: np.ndarray, rho: float, rng: np.random.Generator) -> np.ndarray:
    """Patch = y except for an exact share (1 - rho) of each (class, colour) cell, at least 2 per cell
    when rho < 1: drawing the two shortcuts independently per cell keeps them uncorrelated and gives
    every one of the eight groups members (DFR's oracle row needs 2 per group)."""
    patch = y.copy()
    for c in np.unique(y):
        for col in (0, 1):
            idx = np.flatnonzero((y == c) & (colour == col))
            n_min = int(round(len(idx) * (1 - rho)))
            if rho < 1:
                n_min = max(n_min, min(2, len(idx) // 2))
            patch[rng.choice(idx, size=min(n_min, len(idx)), replace=False)] = 1 - c
    return patch


def group_names() -> list[str]:
    return [
        f"y{'>=5' if y else '<5'} {'green' if c else 'red'} {'BR' if p else 'TL'}"
        for y in (0, 1)
        for c in (0, 1)
        for p in (0, 1)
    ]


def gaps(pred: np.ndarray, y: np.ndarray, attrs: dict) -> dict:
    return shortcut_gaps(pred, y, {"colour": attrs["colour"] == y, "patch": attrs["patch"] == y})


@DATASETS.register("cmnist_multi", keys=CmnistMultiKeys)
def build_cmnist_multi(dspec, seed: int) -> GroupData:
    splits = {}
    for name, digits, y, rng in digit_splits(dspec, seed, "cmnist_multi"):
        colour = assign_colours(y, dspec.rho if name != "test" else 0.5, rng)
        patch = assign_patches(y, colour, dspec.rho_patch if name != "test" else 0.5, rng)
        x = to_input(add_patch(colorize(digits, colour), patch), dspec)
        splits[name] = Split(
            images=TensorImages(x), y=y, group=4 * y + 2 * colour + patch, attrs={"colour": colour, "patch": patch}
        )
    return GroupData(**splits, n_classes=2, group_names=group_names(), shortcut_metrics=gaps)
