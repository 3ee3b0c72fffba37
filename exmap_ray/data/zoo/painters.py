"""The zoo's painters: one kind of shortcut each, painted on a batch of MNIST digits, and read back.

A painter draws a two-valued attribute (`Painter.values`) into the images and has a pixel probe
that reads the attribute back from the finished images alone (`Painter.probe`), so a test can check
that the shortcut really is in the pixels. The canvas is S x S; sizes scale with u = S / 32, so the
default 32-pixel canvas holds the 28-pixel digit with a 2-pixel margin and every mark scales with
`dataset.image_size`.

Painting is layered (`Layers`): background painters fill `bg`, ink painters set the digit's colour,
the digit is composited over the background, then overlay painters draw on `img` and post painters
filter it (an acquisition shift applies to everything). All randomness comes from the numpy
generator handed in, so a build is a function of (seed, keys).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ...errors import DataError

log = logging.getLogger(__name__)

BACKGROUND, INK, OVERLAY, POST = 0, 1, 2, 3  # painting order


@dataclass
class Layers:
    bg: torch.Tensor  # (N, 3, S, S) what lies behind the digit; black by default
    ink: torch.Tensor  # (N, 3) the digit's colour; white by default
    alpha: torch.Tensor  # (N, 1, S, S) the digit's coverage in [0, 1]
    img: torch.Tensor = None  # (N, 3, S, S) the composite, set before OVERLAY painters run

    @property
    def size(self) -> int:
        return self.alpha.shape[-1]


@dataclass(frozen=True)
class Painter:
    name: str  # the attribute's name (Split.attrs, group names, gap metrics)
    kind: str  # the real-world shortcut it stands for
    values: tuple  # readable names of attribute values 0 and 1
    stage: int  # BACKGROUND, INK, OVERLAY or POST
    paint: Callable  # (Layers, attr (N,) int64, rng) -> None, drawing into the layers
    probe: Callable  # images (N, 3, S, S) in [0, 1] -> attr (N,) int64, from the pixels alone
    what: str  # one sentence for the docs: what it paints


def _unit(size: int) -> float:
    return size / 32.0


def _sel(attr: np.ndarray, v: int) -> torch.Tensor:
    return torch.as_tensor(np.flatnonzero(attr == v))


def _u(rng: np.random.Generator, lo: float, hi: float, n: int) -> torch.Tensor:
    return torch.as_tensor(rng.uniform(lo, hi, n), dtype=torch.float32).view(n, 1, 1)


# --------------------------------------------------------------------------- colour (C-MNIST, CelebA hair)

INKS = torch.tensor([[1.0, 0.15, 0.1], [0.15, 0.85, 0.2]])  # red, green


def paint_colour(L: Layers, attr, rng) -> None:
    L.ink = INKS[torch.as_tensor(attr)]


def probe_colour(x: torch.Tensor) -> np.ndarray:
    return (x[:, 1].sum((1, 2)) > x[:, 0].sum((1, 2))).long().numpy()


# --------------------------------------------------------------------------- patch (hospital tokens)


def _patch(size: int) -> int:
    return max(1, round(4 * _unit(size)))


def paint_patch(L: Layers, attr, rng) -> None:
    p = _patch(L.size)
    L.img[_sel(attr, 0), :, :p, :p] = 1.0
    L.img[_sel(attr, 1), :, -p:, -p:] = 1.0


def probe_patch(x: torch.Tensor) -> np.ndarray:
    p = _patch(x.shape[-1])
    return (x[:, :, -p:, -p:].mean((1, 2, 3)) > x[:, :, :p, :p].mean((1, 2, 3))).long().numpy()


# --------------------------------------------------------------------------- frame (scanner borders)


def _ring(size: int) -> torch.Tensor:
    w = max(1, round(_unit(size)))
    ring = torch.ones(size, size, dtype=torch.bool)
    ring[w:-w, w:-w] = False
    return ring


def paint_frame(L: Layers, attr, rng) -> None:
    idx = _sel(attr, 1)
    ring = _ring(L.size)
    L.img[idx] = torch.where(ring, torch.tensor(0.9), L.img[idx])


def probe_frame(x: torch.Tensor) -> np.ndarray:
    return (x.mean(1)[:, _ring(x.shape[-1])].mean(1) > 0.5).long().numpy()


# ------------------------------------------------------------------- texture (Waterbirds' backgrounds)

TINT = torch.tensor([1.0, 0.9, 0.75]).view(1, 3, 1, 1)  # one warm tint for both: texture, not colour


def paint_texture(L: Layers, attr, rng) -> None:
    """0: stripes within 20 degrees of horizontal; 1: a grid of soft dots. Random frequency and phase."""
    n, s = len(attr), L.size
    t = (torch.arange(s, dtype=torch.float32) + 0.5) / s
    yy, xx = t.view(1, s, 1), t.view(1, 1, s)
    f, ph1, ph2 = _u(rng, 3.0, 6.0, n), _u(rng, 0, 2 * math.pi, n), _u(rng, 0, 2 * math.pi, n)
    theta = _u(rng, -0.35, 0.35, n)
    stripes = torch.sin(2 * math.pi * f * (yy * torch.cos(theta) + xx * torch.sin(theta)) + ph1)
    dots = torch.sin(2 * math.pi * f * xx + ph1) * torch.sin(2 * math.pi * f * yy + ph2)
    v = torch.where(torch.as_tensor(attr).view(n, 1, 1) == 1, dots, stripes)
    L.bg = (0.08 + 0.35 * (0.5 + 0.5 * v)).unsqueeze(1) * TINT


def probe_texture(x: torch.Tensor) -> np.ndarray:
    """Stripes vary along y only: away from the digit and any bright mark (the texture stays below
    0.45), the x-gradient is small against the y-gradient; dots vary alike in both."""
    g = x.mean(1, keepdim=True)
    free = (F.max_pool2d((x.amax(1, keepdim=True) > 0.46).float(), 5, 1, 2) == 0).float()
    gx = ((g[..., :, 1:] - g[..., :, :-1]).abs() * free[..., :, 1:] * free[..., :, :-1]).sum((1, 2, 3))
    gy = ((g[..., 1:, :] - g[..., :-1, :]).abs() * free[..., 1:, :] * free[..., :-1, :]).sum((1, 2, 3))
    return (gx > 0.6 * gy).long().numpy()


# --------------------------------------------------------------------------- photo (Waterbirds, MetaShift)

# Photographs that ship inside the scikit-image wheel (skimage/data), read from the installed package:
# grey ground textures against colour scenes, as Waterbirds' land and water differ in content and
# colour at once. The sha256 prefixes are those of scikit-image 0.25.0 and 0.26.0 (identical files).
PHOTOS = {
    0: {"grass.png": "b6b6022426b38936", "gravel.png": "c48615b451bf1e60", "brick.png": "7966caf324f6ba84"},
    1: {
        "coffee.png": "cc02f8ca188b167c",
        "chelsea.png": "596aa1e7cb875eb7",
        "astronaut.png": "88431cd9653ccd53",
        "rocket.jpg": "c2dd0de7c538df8d",
        "motorcycle_left.png": "db18e9c415761740",
    },
}


def photo_folder() -> Path:
    spec = importlib.util.find_spec("skimage")
    if spec is None or spec.origin is None:
        raise DataError(
            "the zoo's photo backgrounds are read from the scikit-image package, which is not "
            "installed; pip install scikit-image (a dependency of exmap-ray)"
        )
    return Path(spec.origin).parent / "data"


@lru_cache(maxsize=8)
def load_photos(size: int) -> dict[int, list[torch.Tensor]]:
    """value -> photos (3, H, W) in [0, 1], scaled so the short side is twice the canvas: a crop shows
    about a quarter of the photograph."""
    from PIL import Image

    folder, out = photo_folder(), {}
    for value, files in PHOTOS.items():
        out[value] = []
        for name, want in files.items():
            path = folder / name
            if not path.is_file():
                raise DataError(
                    f"zoo photo '{path}' is missing from the installed scikit-image; "
                    f"reinstall it (pip install --force-reinstall scikit-image)"
                )
            if want and not hashlib.sha256(path.read_bytes()).hexdigest().startswith(want):
                log.warning(
                    "zoo photo %s differs from scikit-image 0.25-0.26's: zoo_photo images will "
                    "differ from those made with it",
                    path,
                )
            with Image.open(path) as im:
                im = im.convert("RGB")
                k = 2 * size / min(im.size)
                im = im.resize(
                    (max(size, round(im.size[0] * k)), max(size, round(im.size[1] * k))),
                    Image.BOX if k < 1 else Image.BICUBIC,
                )
                out[value].append(torch.tensor(np.asarray(im), dtype=torch.float32).permute(2, 0, 1) / 255)
    return out


def paint_photo(L: Layers, attr, rng) -> None:
    """A random crop (random photo of the attribute's set, position, mirror) at reduced contrast, so the
    white digit stays readable on bright photographs."""
    n, s = len(attr), L.size
    photos = load_photos(s)
    bg = torch.empty(n, 3, s, s)
    counts = np.array([len(photos[v]) for v in sorted(photos)])
    which = (rng.random(n) * counts[attr]).astype(np.int64)  # a photo of the attribute's set, uniformly
    oy, ox, flip = rng.random(n), rng.random(n), rng.random(n) < 0.5
    ar = torch.arange(s)
    for value, group in photos.items():
        for k, ph in enumerate(group):
            idx = np.flatnonzero((attr == value) & (which == k))
            if not len(idx):
                continue
            h, w = ph.shape[1:]
            top = torch.as_tensor((oy[idx] * (h - s + 1)).astype(np.int64))
            left = torch.as_tensor((ox[idx] * (w - s + 1)).astype(np.int64))
            cols = torch.where(torch.as_tensor(flip[idx]).view(-1, 1), s - 1 - ar, ar) + left.view(-1, 1)
            rows = top.view(-1, 1) + ar
            bg[torch.as_tensor(idx)] = ph[:, rows[:, :, None], cols[:, None, :]].permute(1, 0, 2, 3)
    L.bg = 0.08 + 0.55 * bg


def probe_photo(x: torch.Tensor) -> np.ndarray:
    """The ground photographs are grey, the scenes are not: mean saturation (the white digit adds none)."""
    return ((x.amax(1) - x.amin(1)).mean((1, 2)) > 0.01).long().numpy()


# ------------------------------------------------------------------- object (UrbanCars' co-occurring objects)

YELLOW = torch.tensor([1.0, 0.85, 0.0])


def _stamps(size: int) -> torch.Tensor:
    """(2, o, o) masks: 0 a ring, 1 a plus, o about 7 pixels on the 32 canvas."""
    o = max(5, round(7 * _unit(size)) | 1)
    c = torch.arange(o, dtype=torch.float32) - (o - 1) / 2
    d = (c.view(-1, 1) ** 2 + c.view(1, -1) ** 2).sqrt()
    r, t = (o - 1) / 2, max(1.0, o / 6)
    ring = (d <= r + 0.3) & (d >= r + 0.3 - t)
    half = max(0, round(o / 14))
    plus = (c.view(-1, 1).abs() <= half) | (c.view(1, -1).abs() <= half)
    return torch.stack([ring, plus])


def paint_object(L: Layers, attr, rng) -> None:
    """A small yellow ring (0) or plus (1) in a random corner beside the digit, with a little jitter."""
    n, s = len(attr), L.size
    stamps = _stamps(s)
    o = stamps.shape[-1]
    m = max(1, round(_unit(s)))
    corner = rng.integers(4, size=n)
    jy, jx = rng.integers(0, m + 1, size=n), rng.integers(0, m + 1, size=n)
    top = np.where(corner // 2 == 0, m + jy, s - o - m - jy)
    left = np.where(corner % 2 == 0, m + jx, s - o - m - jx)
    ar = torch.arange(o)
    rows = torch.as_tensor(top).view(-1, 1) + ar
    cols = torch.as_tensor(left).view(-1, 1) + ar
    at = (torch.arange(n).view(-1, 1, 1), slice(None), rows[:, :, None], cols[:, None, :])
    mask = stamps[torch.as_tensor(attr)].unsqueeze(-1)  # (n, o, o, 1)
    L.img[at] = torch.where(mask, YELLOW, L.img[at])  # L.img[at]: (n, o, o, 3)


def probe_object(x: torch.Tensor) -> np.ndarray:
    """Find the yellow pixels; a plus covers its own centre, a ring does not."""
    yellow = ((x[:, 0] > 0.6) & (x[:, 1] > 0.5) & (x[:, 2] < 0.3)).float()
    s = x.shape[-1]
    grid = torch.arange(s, dtype=torch.float32)
    mass = yellow.sum((1, 2)).clamp_min(1)
    cy = ((yellow.sum(2) * grid).sum(1) / mass).round().long().clamp(0, s - 1)
    cx = ((yellow.sum(1) * grid).sum(1) / mass).round().long().clamp(0, s - 1)
    return (yellow[torch.arange(len(x)), cy, cx] > 0).long().numpy()


# --------------------------------------------------------------------------- watermark (ImageNet-W)

GLYPHS = {  # a 3x5 pixel font, enough for the word
    "S": ["111", "100", "111", "001", "111"],
    "T": ["111", "010", "010", "010", "010"],
    "O": ["111", "101", "101", "101", "111"],
    "C": ["111", "100", "100", "100", "111"],
    "K": ["101", "101", "110", "101", "101"],
}
WORD = "STOCK"
MARK = torch.tensor([0.55, 0.75, 1.0]).view(1, 3, 1, 1)


def _word(size: int) -> torch.Tensor:
    rows = ["0".join(GLYPHS[ch][r] for ch in WORD) for r in range(5)]
    m = torch.tensor([[c == "1" for c in row] for row in rows], dtype=torch.float32)
    k = max(1, round(_unit(size)))
    return m.repeat_interleave(k, 0).repeat_interleave(k, 1)


def paint_watermark(L: Layers, attr, rng) -> None:
    """The word STOCK in translucent pale blue across the middle, at a random height (1); none (0)."""
    idx = np.flatnonzero(attr == 1)
    s, word = L.size, _word(L.size)
    h, w = word.shape
    top = rng.integers(int(0.3 * s), max(int(0.3 * s) + 1, int(0.7 * s) - h + 1), size=len(idx))
    shift = max(1, round(2 * _unit(s)))
    left = np.clip((s - w) // 2 + rng.integers(-shift, shift + 1, size=len(idx)), 0, max(0, s - w))
    for t in np.unique(top):
        for lf in np.unique(left[top == t]):
            sel = torch.as_tensor(idx[(top == t) & (left == lf)])
            a = torch.zeros(1, 1, s, s)
            a[0, 0, t : t + h, lf : lf + w] = 0.5 * word[: s - t, : s - lf]
            L.img[sel] = L.img[sel] * (1 - a) + MARK * a


def probe_watermark(x: torch.Tensor) -> np.ndarray:
    """The mark is bluer than red by 0.2 wherever it lies; the white or black pixels under it are not."""
    return (((x[:, 2] - x[:, 0]) > 0.1).sum((1, 2)) >= 5).long().numpy()


# --------------------------------------------------------------------------- blur (acquisition shift)


def _gauss(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur with replicated edges, as two (S, S) matrix products: far faster on CPU than a
    depthwise convolution of a few thousand small images."""
    s = x.shape[-1]
    r = max(1, math.ceil(3 * sigma))
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    B = torch.zeros(s, s)
    rows = torch.arange(s).view(-1, 1)
    cols = (rows + t.long()).clamp(0, s - 1)  # replicated edges: weight past an edge lands on it
    B.index_put_((rows.expand(-1, len(t)), cols), k.expand(s, -1), accumulate=True)
    return B @ x @ B.T


def _sigma(size: int) -> float:
    return max(1.0, _unit(size))  # 1 pixel on the 32 canvas; never under a pixel on smaller ones


def paint_blur(L: Layers, attr, rng) -> None:
    """A Gaussian blur of the whole image (1): a softer scanner or out-of-focus camera; sharp (0)."""
    idx = _sel(attr, 1)
    if len(idx):
        L.img[idx] = _gauss(L.img[idx], _sigma(L.size))


def _max_step(x: torch.Tensor) -> torch.Tensor:
    g = x.amax(1)
    return torch.maximum((g[:, :, 1:] - g[:, :, :-1]).abs().amax((1, 2)), (g[:, 1:] - g[:, :-1]).abs().amax((1, 2)))


def probe_blur(x: torch.Tensor) -> np.ndarray:
    """Blur once more and see how much the steepest step between neighbouring pixels drops: a sharp
    stroke edge loses over half of it (ratio < 0.49 at 12 to 128 pixels), a blurred one less (> 0.53)."""
    ratio = _max_step(_gauss(x, _sigma(x.shape[-1]))) / _max_step(x).clamp_min(1e-6)
    return (ratio > 0.51).long().numpy()


PAINTERS = {
    p.name: p
    for p in [
        Painter(
            "colour",
            "colour of the object (C-MNIST, CelebA's hair)",
            ("red", "green"),
            INK,
            paint_colour,
            probe_colour,
            "the digit is drawn red (0) or green (1) on black",
        ),
        Painter(
            "patch",
            "position of a mark (hospital tokens in X-rays)",
            ("TL", "BR"),
            OVERLAY,
            paint_patch,
            probe_patch,
            "a white 4x4 square in the top-left (0) or bottom-right (1) corner",
        ),
        Painter(
            "frame",
            "a border (scanner borders)",
            ("no-frame", "frame"),
            OVERLAY,
            paint_frame,
            probe_frame,
            "a light-grey frame one pixel wide around the image (1), or none (0)",
        ),
        Painter(
            "texture",
            "background texture (Waterbirds)",
            ("stripes", "dots"),
            BACKGROUND,
            paint_texture,
            probe_texture,
            "a dim procedural texture behind the digit: stripes within 20 "
            "degrees of horizontal (0) or a grid of soft dots (1), random "
            "frequency and phase",
        ),
        Painter(
            "photo",
            "natural background (Waterbirds, MetaShift)",
            ("ground", "scene"),
            BACKGROUND,
            paint_photo,
            probe_photo,
            "a random crop of a photograph from scikit-image's data, at reduced "
            "contrast, behind the digit: grass, gravel or brick (grey, 0) or "
            "coffee, chelsea, astronaut, rocket or motorcycle (colour, 1)",
        ),
        Painter(
            "object",
            "co-occurring object (UrbanCars)",
            ("ring", "plus"),
            OVERLAY,
            paint_object,
            probe_object,
            "a small yellow ring (0) or plus (1) in a random corner",
        ),
        Painter(
            "watermark",
            "overlay (ImageNet-W's watermark)",
            ("no-mark", "mark"),
            OVERLAY,
            paint_watermark,
            probe_watermark,
            "the word STOCK in translucent pale blue at a random height across the middle (1), or none (0)",
        ),
        Painter(
            "blur",
            "acquisition shift (blur)",
            ("sharp", "blurred"),
            POST,
            paint_blur,
            probe_blur,
            "the whole image is sharp (0) or Gaussian-blurred (1), sigma 1 pixel at 32",
        ),
    ]
}
