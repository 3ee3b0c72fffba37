"""The shortcut zoo: MNIST digits carrying one or two painted shortcuts, one family per kind real data has.

    exmap-ray run zoo_texture
    exmap-ray run zoo_frame_patch --set dataset.classes=10

Each family is a list of painters (painters.py: colour, patch, frame, texture, photo, object,
watermark, blur), and a new family is one line of `FAMILIES`. All are built from the 10,000 real
MNIST test digits that ship with exmap-ray (split without overlap; nothing is downloaded), drawn on a
32x32 canvas by default (`dataset.image_size` sets it; the marks scale with it).

- Classes: `dataset.classes: 2` gives y = digit >= 5; `10` gives y = digit. Every attribute has two
  values and "agrees with the class" means attribute = y mod 2: with two classes the attribute equals y,
  with ten it equals the digit's parity.
- On train and val the first attribute agrees with the class with probability `dataset.rho`, an exact
  share of each class; a pair's second attribute agrees with probability `dataset.rho_<name>` within
  each (class, first attribute) cell, so the two are drawn independently (cmnist_multi's scheme). On
  test each attribute is independent of the class (exactly half of each cell).
- Each minority cell is given at least 2 members per group it will be split into, when the split can
  afford it, so every true group has >= 2 members in val (the oracle DFR row needs 2).
- True group = y * 2 + a for one attribute, (y * 2 + a1) * 2 + a2 for a pair; `Split.attrs` holds each
  attribute under its painter's name, and the test metrics include the per-shortcut gaps.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial
from itertools import product

import numpy as np
import torch
import torch.nn.functional as F

from ...errors import SpecError
from ...hashing import stage_seed
from ...metrics import shortcut_gaps
from ...options import fraction, opt, positive
from ..base import DATASETS, GroupData, Split, TensorImages
from ..cmnist import load_digits, to_input
from .painters import INK, OVERLAY, PAINTERS, Layers, Painter

SIZE = 32  # the zoo's canvas when dataset.image_size is None: the 28-pixel digit and a 2-pixel margin
MIN_SIZE = 16  # below it a texture's stripes alias and the probes cannot read the marks back
N_DIGITS = 10_000


@dataclass(frozen=True)
class Family:
    painters: tuple  # painter names, first to last
    rho: tuple  # default P(agrees with the class) on train/val, one per painter


FAMILIES = {
    "zoo_colour": Family(("colour",), (0.98,)),
    "zoo_patch": Family(("patch",), (0.98,)),
    "zoo_frame": Family(("frame",), (0.98,)),
    "zoo_texture": Family(("texture",), (0.98,)),
    "zoo_photo": Family(("photo",), (0.98,)),
    "zoo_object": Family(("object",), (0.98,)),
    "zoo_watermark": Family(("watermark",), (0.98,)),
    "zoo_blur": Family(("blur",), (0.98,)),
    "zoo_frame_patch": Family(("frame", "patch"), (0.97, 0.9)),
    "zoo_texture_object": Family(("texture", "object"), (0.97, 0.9)),
    "zoo_colour_blur": Family(("colour", "blur"), (0.97, 0.9)),
}

RHO_WHY = {  # one reason per form, so `exmap-ray spec` lists the families that share it on one line
    1: "P(the family's shortcut agrees with the class) on train and val; independent of the class on test. "
    "0.98: 40 minority images per class in val at the default sizes",
    2: "P(the pair's first shortcut agrees with the class) on train and val; independent of the class on "
    "test. 0.97 as cmnist_multi's colour: weaker than 0.98 so the groups where both disagree have members",
}


def _classes(v):
    return None if v in (2, 10) else "2 (y = digit >= 5) or 10 (y = digit)"


def family_keys(name: str, family: Family) -> type:
    """The family's own spec keys (dataset.*): rho for its first painter, rho_<painter> for a second one,
    the class form and the split sizes."""
    first = family.painters[0]
    fields = [("rho", float, opt(family.rho[0], RHO_WHY[len(family.painters)], fraction))]
    for p, rho in zip(family.painters[1:], family.rho[1:]):
        why = (
            f"P(the {p} agrees with the class) within each (class, {first}) cell of train and val, so "
            f"independently of the {first}; independent of the class on test"
        )
        fields.append((f"rho_{p}", float, opt(rho, why, fraction)))
    fields += [
        (
            "classes",
            int,
            opt(2, "2: y = digit >= 5; 10: y = digit (each attribute then agrees with the digit's parity)", _classes),
        ),
        ("n_train", int, opt(4000, "training images (n_train + n_val + n_test <= 10,000 shipped digits)", positive)),
        (
            "n_val",
            int,
            opt(
                4000,
                "validation images; ExMap clusters these and DFR fits on them, so minority groups need members",
                positive,
            ),
        ),
        ("n_test", int, opt(2000, "test images (every attribute independent of the class)", positive)),
    ]
    cls = dataclasses.make_dataclass(
        "".join(w.title() for w in name.split("_")) + "Keys",
        fields,
        namespace={"__post_init__": lambda self: check_keys(self, name)},
    )
    cls.__module__ = __name__
    cls.__doc__ = f"{name}'s own keys: its shortcut strengths, class form and split sizes."
    return cls


def assign_attrs(y: np.ndarray, rhos: list[float], ks: list[int], rng: np.random.Generator) -> list[np.ndarray]:
    """One attribute per painter; attribute i agrees with the class (= y mod k_i) on an exact share rho_i of
    each cell of (class, attributes before it). A minority cell keeps at least 2 members for every group
    the later attributes split it into, and so does the majority, when the cell is large enough."""
    cells, out = y.copy(), []
    for i, (rho, k) in enumerate(zip(rhos, ks)):
        need = 2 * int(np.prod(ks[i + 1 :]))
        aligned = y % k
        a = aligned.copy()
        for c in np.unique(cells):
            idx = np.flatnonzero(cells == c)
            floor = min(need, len(idx) // 2)
            n_min = int(round(len(idx) * (1 - rho)))
            n_min = max(n_min, floor) if rho < 1 else n_min
            n_min = min(n_min, len(idx) - floor) if rho > 0 else n_min
            flip = rng.choice(idx, size=n_min, replace=False)
            a[flip] = (aligned[flip] + rng.integers(1, k, size=n_min)) % k  # any other value
        out.append(a)
        cells = cells * k + a
    return out


def digit_alpha(digits: np.ndarray, size: int) -> torch.Tensor:
    """(N, 28, 28) uint8 -> (N, 1, S, S) coverage: the digit scaled by S/32, centred."""
    a = torch.tensor(digits, dtype=torch.float32).unsqueeze(1) / 255.0
    d = max(1, round(28 * size / SIZE))
    if d != 28:
        a = F.interpolate(a, size=(d, d), mode="bilinear", align_corners=False, antialias=d < 28).clamp_(0, 1)
    lo = (size - d) // 2
    return F.pad(a, (lo, size - d - lo, lo, size - d - lo))


def render(
    painters: list[Painter], digits: np.ndarray, attrs: list[np.ndarray], size: int, rng: np.random.Generator
) -> torch.Tensor:
    """Paint every painter's attribute into the digits: backgrounds and ink, the composite, then overlays
    and post filters, each layer in the family's order. (N, 3, S, S) float in [0, 1]."""
    alpha = digit_alpha(digits, size)
    n = len(digits)
    layers = Layers(bg=torch.zeros(n, 3, size, size), ink=torch.ones(n, 3), alpha=alpha)
    order = sorted(range(len(painters)), key=lambda i: painters[i].stage)
    for i in (i for i in order if painters[i].stage <= INK):
        painters[i].paint(layers, attrs[i], rng)
    layers.img = layers.bg * (1 - alpha) + layers.ink.view(n, 3, 1, 1) * alpha
    for i in (i for i in order if painters[i].stage >= OVERLAY):
        painters[i].paint(layers, attrs[i], rng)
    return layers.img.clamp_(0, 1)


def class_names(classes: int) -> list[str]:
    return ["y<5", "y>=5"] if classes == 2 else [f"y={d}" for d in range(10)]


def group_names(painters: list[Painter], classes: int) -> list[str]:
    """Index = true group: y, then each attribute's value, the last varying fastest."""
    return [" ".join([c, *vals]) for c in class_names(classes) for vals in product(*(p.values for p in painters))]


def group_of(y: np.ndarray, attrs: list[np.ndarray], ks: list[int]) -> np.ndarray:
    g = y.copy()
    for a, k in zip(attrs, ks):
        g = g * k + a
    return g.astype(np.int64)


def gaps(pred: np.ndarray, y: np.ndarray, attrs: dict, names: tuple) -> dict:
    """Per-shortcut gaps (metrics.shortcut_gaps): an attribute agrees where it equals y mod 2."""
    return shortcut_gaps(pred, y, {n: attrs[n] == y % 2 for n in names})


def check_keys(dspec, name: str) -> None:
    """What one key's check cannot see, refused when the spec is read: the sizes together, the canvas."""
    split_sizes(dspec, name)
    size = getattr(dspec, "image_size", None)  # a common key: absent from the bare keys class
    if size is not None and size < MIN_SIZE:
        raise SpecError(
            f"spec key 'dataset.image_size': got {size}, but dataset '{name}' draws its marks "
            f"and textures on a canvas of at least {MIN_SIZE} pixels; use {MIN_SIZE} or more, or "
            f"null for the zoo's {SIZE}"
        )


def split_sizes(dspec, name: str) -> dict[str, int]:
    """The split sizes, refused (when the spec is read, too) if they need more than the shipped digits."""
    sizes = {"train": dspec.n_train, "val": dspec.n_val, "test": dspec.n_test}
    total = sum(sizes.values())
    if total > N_DIGITS:
        raise SpecError(
            f"spec keys 'dataset.n_train' + 'dataset.n_val' + 'dataset.n_test' = {total}, but "
            f"dataset '{name}' draws from the {N_DIGITS:,} MNIST digits shipped with exmap-ray, "
            f"each used once; lower them to a total of at most {N_DIGITS:,}"
        )
    return sizes


def build_zoo(dspec, seed: int, family: Family) -> GroupData:
    painters = [PAINTERS[n] for n in family.painters]
    ks = [len(p.values) for p in painters]
    rhos = [dspec.rho] + [getattr(dspec, f"rho_{p.name}") for p in painters[1:]]
    size = dspec.image_size or SIZE
    sizes = split_sizes(dspec, dspec.name)
    digits, labels = load_digits(None)
    rng = np.random.default_rng(stage_seed(seed, dspec.name))
    order = rng.permutation(len(digits))
    splits, start = {}, 0
    for name, n in sizes.items():
        idx = order[start : start + n]
        start += n
        y = labels[idx] if dspec.classes == 10 else (labels[idx] >= 5).astype(np.int64)
        attrs = assign_attrs(y, rhos if name != "test" else [1.0 / k for k in ks], ks, rng)
        x = to_input(render(painters, digits[idx], attrs, size, rng), dspec)
        splits[name] = Split(
            images=TensorImages(x),
            y=y,
            group=group_of(y, attrs, ks),
            attrs={p.name: a for p, a in zip(painters, attrs)},
        )
    return GroupData(
        **splits,
        n_classes=dspec.classes,
        group_names=group_names(painters, dspec.classes),
        shortcut_metrics=partial(gaps, names=tuple(family.painters)),
    )


def _summary(name: str, family: Family) -> str:
    kinds = " + ".join(PAINTERS[p].kind for p in family.painters)
    return f"Shortcut zoo: MNIST digits with {kinds}"


def _builder(family: Family):
    def build(dspec, seed: int) -> GroupData:
        return build_zoo(dspec, seed, family)

    return build


for _name, _family in FAMILIES.items():  # one registration per family, each with its own keys
    DATASETS.register(_name, keys=family_keys(_name, _family), summary=_summary(_name, _family))(_builder(_family))
