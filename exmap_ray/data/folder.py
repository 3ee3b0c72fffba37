"""The group_DRO / Waterbirds folder layout.

    exmap-ray run folder --set dataset.root=/data/waterbird_complete95_forest2water2

ROOT/metadata.csv has the columns
- `img_filename`: the image path relative to ROOT;
- `y`: the class, 0..C-1;
- `split`: 0 train, 1 val, 2 test;
- `place` or `spurious`: the spurious attribute, 0..S-1 (evaluation only);
- optionally `group`, which overrides group = y * S + spurious.

The whole table is checked before any training: missing columns, bad split
values, empty splits and missing image files are reported by name.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms

from ..errors import DataError, SpecError
from .base import DATASETS, GroupData, Split

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
            raise DataError(f"image '{self.paths[i]}' cannot be read ({e}); replace it or drop its "
                            f"row from metadata.csv") from None

    def check(self) -> None:
        """Open every file (header + PIL's verify, no full decode) so a corrupt image fails now, by name."""
        bad = []
        for p in self.paths:
            try:
                with Image.open(p) as im:
                    im.verify()
            except Exception as e:  # PIL raises many types (UnidentifiedImageError, SyntaxError, struct.error)
                bad.append((p, e))
        if bad:
            p, e = bad[0]
            raise DataError(f"{len(bad)} of {len(self.paths)} image file(s) cannot be read as images, e.g. "
                            f"'{p}' ({type(e).__name__}: {e}); expected PNG/JPEG or another format PIL opens. "
                            f"Replace them or drop their rows from metadata.csv")


def _int_column(rows, col, path) -> np.ndarray:
    out = []
    for line, row in enumerate(rows, start=2):
        try:
            out.append(int(float(row[col])))
        except (TypeError, ValueError):
            raise DataError(f"'{path}' line {line}: column '{col}' has {row[col]!r}, expected an integer") from None
    return np.asarray(out, dtype=np.int64)


def read_metadata(root: Path, missing_ok: bool = False) -> dict:
    """Parse and validate ROOT/metadata.csv; returns columns as arrays plus the file paths.

    With `missing_ok`, image files that are not on disk do not raise: they are returned as
    `absent`, a list of (csv line, path), so a layout check can list every one of them.
    """
    meta = root / "metadata.csv"
    if not meta.is_file():
        raise DataError(f"'{meta}' not found: the folder dataset needs ROOT/metadata.csv with columns "
                        f"img_filename, y, split and place or spurious")
    with open(meta, newline="") as f:
        reader = csv.DictReader(f)
        cols = set(reader.fieldnames or [])
        rows = list(reader)
    missing = [c for c in ("img_filename", "y", "split") if c not in cols]
    if missing:
        raise DataError(f"'{meta}' lacks column(s) {', '.join(missing)}; it has {', '.join(sorted(cols))}. "
                        f"Needed: img_filename, y, split (0 train, 1 val, 2 test) and place or spurious")
    spurious_col = "place" if "place" in cols else "spurious" if "spurious" in cols else None
    if spurious_col is None:
        raise DataError(f"'{meta}' needs a 'place' or 'spurious' column (the spurious attribute, "
                        f"used for evaluation only); it has {', '.join(sorted(cols))}")
    if not rows:
        raise DataError(f"'{meta}' has no rows")
    split = _int_column(rows, "split", meta)
    bad = sorted(set(split.tolist()) - set(SPLITS))
    if bad:
        line = int(np.flatnonzero(~np.isin(split, list(SPLITS)))[0]) + 2
        raise DataError(f"'{meta}' line {line}: split value {bad[0]} is not allowed; use 0 (train), 1 (val), 2 (test)")
    y, s = _int_column(rows, "y", meta), _int_column(rows, spurious_col, meta)
    n_s = int(s.max()) + 1
    if "group" in cols:
        group = _int_column(rows, "group", meta)
        names = [f"group {g}" for g in range(int(group.max()) + 1)]
    else:
        group = y * n_s + s
        names = [f"y={g // n_s} {spurious_col}={g % n_s}" for g in range(int(group.max()) + 1)]
    paths = [root / r["img_filename"] for r in rows]
    absent = [p for p in paths if not p.is_file()]
    if absent and not missing_ok:
        raise DataError(f"{len(absent)} image file(s) listed in '{meta}' are missing, e.g. '{absent[0]}'")
    for code, name in SPLITS.items():
        if not (split == code).any():
            raise DataError(f"'{meta}': the {name} split (split == {code}) is empty")
    for code in (0, 1):  # ERM trains on train; clustering and DFR work per class on val
        if len(np.unique(y[split == code])) < 2:
            raise DataError(f"'{meta}': the {SPLITS[code]} split has a single class (column 'y' is "
                            f"{y[split == code][0]} on every split == {code} row); a classifier needs at least two")
    return {"paths": paths, "y": y, "split": split, "group": group, "group_names": names, "spurious": s,
            "absent": [(i + 2, p) for i, p in enumerate(paths) if not p.is_file()] if absent else []}


def normalization(dspec, default_mean, default_std):
    mean = dspec.mean if dspec.mean is not None else default_mean
    std = dspec.std if dspec.std is not None else default_std
    for key, v in (("dataset.mean", mean), ("dataset.std", std)):
        if len(v) != 3:
            raise SpecError(f"spec key '{key}': got {v}, expected 3 values (one per RGB channel)")
    return mean, std


@DATASETS.register("folder")
def build_folder(dspec, seed: int) -> GroupData:
    if not dspec.root:
        raise SpecError("spec key 'dataset.root' is required for dataset.name 'folder' "
                        "(a folder with metadata.csv and the images)")
    root = Path(dspec.root).expanduser()
    if not root.is_dir():
        raise DataError(f"dataset.root '{root}' is not a folder; expected a folder holding metadata.csv "
                        f"and the images it lists (the group_DRO / Waterbirds layout)")
    m = read_metadata(root)
    size = dspec.image_size or 224
    mean, std = normalization(dspec, IMAGENET_MEAN, IMAGENET_STD)
    tf = transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor(),
                             transforms.Normalize(mean, std)])
    splits = {}
    for code, name in SPLITS.items():
        sel = np.flatnonzero(m["split"] == code)
        splits[name] = Split(images=ImageFiles([m["paths"][i] for i in sel], tf),
                             y=m["y"][sel], group=m["group"][sel])
    return GroupData(**splits, n_classes=int(m["y"].max()) + 1,
                     group_names=m["group_names"])

