"""Image files on disk: the one image path every on-disk dataset takes (`image_group_data` over a
scanned table), the paper's transforms and a decode-once cache for val/test.

Transforms (`PAPER`, as in the DFR / ExMap reference code, for Waterbirds, CelebA, MetaShift, UrbanCars;
`folder` keeps a plain resize to S x S for every split, `RESIZE`):
- train: RandomResizedCrop(S, scale 0.7-1, aspect 3/4-4/3), horizontal flip, ImageNet normalisation;
- eval:  resize to a square of R = round(S * 256 / 224) (256 at S = 224), centre crop S, normalisation.
  The resize is to an R x R square, not shorter-side, as the reference code does.

Decode cache. ERM validates on val every epoch; features read val and test; heatmap actors and the
plots read val again. Decoding a JPEG dominates each of those reads, and the eval transform is
deterministic, so val and test are decoded once, eval-transformed to uint8 (3, S, S) and written to
one .npy per split that every later reader memory-maps. The file lives under `dataset.decode_cache`
(default ~/.cache/exmap_ray/decoded, or $EXMAP_RAY_DECODE_CACHE), named by a hash of the file list
(paths, sizes, mtimes) and the transform, so an edited dataset or another image size gets a new file
and any run, sweep trial or Ray worker on the same machine reuses it. Train images are still decoded
every epoch: their transform is random. `dataset.decode_cache: null` turns the cache off.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ..errors import DataError, SpecError
from ..storage import atomic_path
from .base import GroupData, Split

log = logging.getLogger(__name__)
CACHE_VERSION = 1
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
SPLITS = {0: "train", 1: "val", 2: "test"}


class ImageFiles(Dataset):
    def __init__(self, paths: list[Path], transform):
        self.paths, self.transform = paths, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            with Image.open(self.paths[i]) as im:
                return self.transform(im.convert("RGB"))
        except (OSError, ValueError) as e:
            raise DataError(
                f"image '{self.paths[i]}' cannot be read ({e}); replace it, or drop it from the "
                f"dataset's index (`exmap-ray datasets check` lists every such file)"
            ) from None


def normalization(dspec, default_mean, default_std):
    mean = dspec.mean if dspec.mean is not None else default_mean
    std = dspec.std if dspec.std is not None else default_std
    for key, v in (("dataset.mean", mean), ("dataset.std", std)):
        if len(v) != 3:
            raise SpecError(f"spec key '{key}': got {v}, expected 3 values (one per RGB channel)")
    return mean, std


def eval_resize(size: int) -> int:
    """The square the eval transform resizes to before the centre crop: 256 for 224."""
    return int(round(size * 256 / 224))


def train_transform(size: int, mean, std):
    from torchvision import transforms  # imported here: processes that build no images skip its import

    return transforms.Compose(
        [
            transforms.RandomResizedCrop(size, scale=(0.7, 1.0), ratio=(3 / 4, 4 / 3)),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ]
    )


def eval_transform_uint8(size: int):
    """Resize + centre crop to a uint8 (3, S, S) tensor: what the decode cache stores."""
    from torchvision import transforms  # imported here: processes that build no images skip its import

    r = eval_resize(size)
    return transforms.Compose([transforms.Resize((r, r)), transforms.CenterCrop(size), transforms.PILToTensor()])


def resize_transform(size: int, mean, std):
    """`folder`'s transform for every split: a plain resize to S x S, no crop and no augmentation."""
    from torchvision import transforms  # imported here: processes that build no images skip its import

    return transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor(), transforms.Normalize(mean, std)])


def resize_transform_uint8(size: int):
    from torchvision import transforms  # imported here: processes that build no images skip its import

    return transforms.Compose([transforms.Resize((size, size)), transforms.PILToTensor()])


@dataclass(frozen=True)
class Transforms:
    """How an on-disk dataset's images become tensors: `train(S, mean, std)` (may be random) and
    `eval_uint8(S)`, deterministic, to uint8 (3, S, S): what the decode cache stores."""

    name: str
    train: Callable
    eval_uint8: Callable


PAPER = Transforms("paper", train_transform, eval_transform_uint8)  # Waterbirds, CelebA, MetaShift, UrbanCars
RESIZE = Transforms("resize", resize_transform, resize_transform_uint8)  # folder: its plain resize


def decode_cache_dir(dspec) -> Path | None:
    where = dspec.decode_cache
    if where is None or str(where).lower() in ("off", "none", "false"):
        return None
    if where == "auto":
        return Path(os.environ.get("EXMAP_RAY_DECODE_CACHE") or Path.home() / ".cache" / "exmap_ray" / "decoded")
    return Path(where).expanduser()


def _files_key(paths: list[Path], size: int, how: str = "paper") -> str:
    what = {"v": CACHE_VERSION, "size": size, "resize": eval_resize(size)}
    h = hashlib.sha256(json.dumps(what if how == "paper" else {**what, "transforms": how}).encode())
    for p in paths:
        st = p.stat()
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def decode_to_npy(files: ImageFiles, out: Path, size: int, workers: int) -> None:
    """Decode every image of `files` (a uint8 transform) into `out`, (N, 3, S, S) uint8; once, under a lock."""
    with _locked(out.with_name(out.name + ".lock")):
        if out.is_file():
            return
        in_worker = torch.utils.data.get_worker_info() is not None  # a DataLoader worker cannot start its own
        loader = DataLoader(files, batch_size=64, shuffle=False, num_workers=0 if in_worker else workers)
        mb = len(files) * 3 * size * size / 2**20
        log.info("decoding %d images once into %s (%.0f MiB)", len(files), out, mb)
        with atomic_path(out) as tmp:
            arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(files), 3, size, size))
            start = 0
            for batch in loader:
                arr[start : start + len(batch)] = batch.numpy()
                start += len(batch)
            arr.flush()
            del arr


class EvalImages(Dataset):
    """Eval-transformed images (val/test): from the decode cache when it is on, else decoded per access.

    Items are normalised float tensors (3, S, S), the same values the uncached transform gives.
    """

    def __init__(
        self,
        paths: list[Path],
        size: int,
        mean,
        std,
        cache_dir: Path | None = None,
        tag: str = "images",
        workers: int = 0,
        how: Transforms = PAPER,
    ):
        self.paths, self.size = list(paths), size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.files = ImageFiles(self.paths, how.eval_uint8(size))
        self.cache_file = None
        if cache_dir is not None and self.paths:
            self.cache_file = Path(cache_dir) / f"{tag}-{size}px-{_files_key(self.paths, size, how.name)}.npy"
            decode_to_npy(self.files, self.cache_file, size, workers)
        self._arr = None

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        if self.cache_file is None:
            x = self.files[i]
        else:
            if self._arr is None:  # opened lazily, so each process (DataLoader or Ray worker) maps its own
                self._arr = np.load(self.cache_file, mmap_mode="r")
            x = torch.from_numpy(np.array(self._arr[i]))
        return (x.float() / 255.0 - self.mean) / self.std

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_arr"] = None
        return state


def image_group_data(table: dict, dspec, name: str, shortcut_metrics=None, how: Transforms = PAPER) -> GroupData:
    """A GroupData over image files from a scanned table: paths, y, split (0/1/2), group, group_names,
    n_classes and optional per-sample attrs. Train gets `how.train`; val/test `how.eval_uint8` (cached)."""
    size = dspec.image_size or 224
    mean, std = normalization(dspec, IMAGENET_MEAN, IMAGENET_STD)
    cache = decode_cache_dir(dspec)
    paths, split = table["paths"], np.asarray(table["split"])
    attrs = table.get("attrs") or {}
    splits = {}
    for code, sname in SPLITS.items():
        sel = np.flatnonzero(split == code)
        sel_paths = [paths[i] for i in sel]
        if sname == "train":
            images = ImageFiles(sel_paths, how.train(size, mean, std))
        else:
            images = EvalImages(
                sel_paths, size, mean, std, cache, tag=f"{name}-{sname}", workers=dspec.loader_workers, how=how
            )
        splits[sname] = Split(
            images=images,
            y=np.asarray(table["y"])[sel],
            group=np.asarray(table["group"])[sel],
            attrs={k: np.asarray(v)[sel] for k, v in attrs.items()},
        )
    return GroupData(
        **splits,
        n_classes=int(table["n_classes"]),
        group_names=list(table["group_names"]),
        shortcut_metrics=shortcut_metrics,
    )
