"""CelebA (Liu et al., ICCV 2015) as a spurious-correlation benchmark: Blond_Hair vs Male by default.

    exmap-ray datasets check celeba --root /data/celeba
    exmap-ray run celeba --set dataset.root=/data/celeba
    exmap-ray run celeba --set dataset.root=/data/celeba --set dataset.target=Smiling \\
        --set dataset.spurious=Eyeglasses

ROOT holds the images and an index, in one of two forms:
- the official files: `img_align_celeba/` (000001.jpg ... 202599.jpg), `list_attr_celeba.txt` (a count
  line, the 40 attribute names, then one line per image with -1/1 values) and `list_eval_partition.txt`
  (image and 0 train / 1 val / 2 test), in ROOT or where the official download keeps them
  (ROOT/Img/img_align_celeba/, ROOT/Anno/, ROOT/Eval/). The Kaggle / group_DRO copies name the index
  files `.csv` (image_id column) and may nest the images in img_align_celeba/img_align_celeba/.
  `dataset.target` and `dataset.spurious` pick any two of the 40 attributes.
- the DFR file: `metadata.csv` (DFR's celeba_metadata.csv renamed) with img_filename, y = Blond_Hair,
  split and place = Male. It is used when present and the pair is the default one.

y = target, true group = 2 * y + spurious (evaluation only).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import SpecError, near_name
from ..options import opt
from .folder import scan_metadata_csv
from .base import DATASETS
from .layout import MAX_LISTED, RootKeys, Scan, find_below, missing_files, require_root

DEFAULT_TARGET, DEFAULT_SPURIOUS = "Blond_Hair", "Male"
IMAGES = "img_align_celeba"
ATTR_FILES = ("list_attr_celeba.txt", "list_attr_celeba.csv")
PART_FILES = ("list_eval_partition.txt", "list_eval_partition.csv")
SOURCE = "the official CelebA release (Anno/list_attr_celeba.txt, Eval/list_eval_partition.txt, img_align_celeba.zip)"


def _first(root: Path, names, sub: str = "") -> Path | None:
    """ROOT/NAME, or ROOT/SUB/NAME (the official download keeps Anno/, Eval/ and Img/ apart)."""
    for d in (root, root / sub) if sub else (root,):
        for n in names:
            if (d / n).is_file():
                return d / n
    return None


def _index_file(scan: Scan, root: Path, names: tuple, what: str, sub: str) -> Path | None:
    found = _first(root, names, sub)
    if found is not None:
        return found
    inner = next((d for n in names if (d := find_below(root, n)) is not None), None)
    if inner is not None and inner != root / sub:
        scan.add("wrong folder", f"'{root}' has no {names[0]}, but '{inner}' holds one", f"set dataset.root={inner}")
        return None
    near = None
    if root.is_dir():
        others = [p.name for p in root.iterdir() if p.is_file()]
        near = next((h for n in names if (h := near_name(n, others)) is not None), None)
    if near:
        scan.renamed(f"missing {what} file", root / names[0], root / near)
    else:
        scan.add(
            f"missing {what} file",
            f"neither {' nor '.join(names)} is in '{root}' (or its {sub}/)",
            f"put {names[0]} ({sub}/ of the CelebA release) in {root}, or DFR's celeba_metadata.csv "
            f"there as metadata.csv (Blond_Hair vs Male only)",
        )
    return None


def _image_dir(scan: Scan, root: Path) -> Path | None:
    for d in (root / IMAGES, root / "Img" / IMAGES):
        if d.is_dir():
            return d / IMAGES if (d / IMAGES).is_dir() else d  # the Kaggle copy nests it once more
    zips = [z for z in (root / f"{IMAGES}.zip", root / "Img" / f"{IMAGES}.zip") if z.is_file()]
    if zips:
        scan.add(
            "not extracted",
            f"'{root / IMAGES}/' not found, but '{zips[0]}' is there",
            f"unzip {zips[0]} -d {zips[0].parent}",
        )
        return None
    subdirs = [p.name for p in root.iterdir() if p.is_dir()] if root.is_dir() else []
    near = near_name(IMAGES, subdirs)
    if near:
        scan.renamed("wrong folder name", root / IMAGES, root / near, folder=True)
    else:
        scan.add(
            "missing folder",
            f"'{root / IMAGES}/' not found",
            f"extract img_align_celeba.zip (from {SOURCE}) into {root}",
        )
    return None


def read_attributes(path: Path, scan: Scan) -> tuple[list[str], list[str], np.ndarray] | None:
    """(attribute names, image file names, values in {0, 1} (N, 40)) from list_attr_celeba.txt/.csv."""
    if path.suffix == ".csv":
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
        if not rows:
            scan.add("bad attribute file", f"'{path}' is empty", f"restore it from {SOURCE}")
            return None
        names, body, first_line = rows[0][1:], rows[1:], 2
    else:
        lines = path.read_text().splitlines()
        if len(lines) < 2:
            scan.add(
                "bad attribute file",
                f"'{path}' has {len(lines)} line(s); expected a count line, the "
                f"attribute names, then one line per image",
                f"restore it from {SOURCE}",
            )
            return None
        names, body, first_line = lines[1].split(), [ln.split() for ln in lines[2:] if ln.strip()], 3
    files, vals, bad = [], [], []
    for i, row in enumerate(body):
        try:
            v = [int(x) for x in row[1:]]
        except ValueError:
            v = None
        if v is None or len(v) != len(names) or any(x not in (-1, 0, 1) for x in v):
            bad.append(first_line + i)
            continue
        files.append(row[0])
        vals.append(v)
    if bad:
        shown = ", ".join(map(str, bad[:MAX_LISTED])) + (
            f" and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
        )
        scan.add(
            "bad attribute line",
            f"'{path}': line(s) {shown} do not hold a file name and {len(names)} values of -1/1",
            f"restore {path.name} from {SOURCE}",
        )
        return None
    return names, files, (np.asarray(vals, dtype=np.int64) > 0).astype(np.int64).reshape(len(files), len(names))


def read_partition(path: Path, scan: Scan) -> dict[str, int] | None:
    if path.suffix == ".csv":
        with open(path, newline="") as f:
            rows = list(csv.reader(f))[1:]
        first_line = 2
    else:
        rows = [ln.split() for ln in path.read_text().splitlines() if ln.strip()]
        first_line = 1
    out, bad = {}, []
    for i, row in enumerate(rows):
        if len(row) != 2 or row[1].strip() not in ("0", "1", "2"):
            bad.append((first_line + i, " ".join(row)))
            continue
        out[row[0]] = int(row[1])
    if bad:
        shown = ", ".join(f"line {ln} is {txt!r}" for ln, txt in bad[:MAX_LISTED])
        more = f" and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
        scan.add(
            "bad split value",
            f"'{path}': {shown}{more}",
            f"each line of {path.name} must be 'FILE 0|1|2' (0 train, 1 val, 2 test); restore it from {SOURCE}",
        )
        return None
    return out


def _pair(dspec) -> tuple[str, str]:
    target, spurious = dspec.target or DEFAULT_TARGET, dspec.spurious or DEFAULT_SPURIOUS
    if target == spurious:
        raise SpecError(
            f"spec keys 'dataset.target' and 'dataset.spurious' are both '{target}'; pick two "
            f"different CelebA attributes"
        )
    return target, spurious


def group_names(target: str, spurious: str) -> list[str]:
    return [f"{target}={y} {spurious}={s}" for y in (0, 1) for s in (0, 1)]


@dataclass
class CelebaKeys(RootKeys):
    """CelebA's own spec keys (dataset.*): the folder and the attribute pair."""

    target: Optional[str] = opt(
        None, "the attribute to predict; None = Blond_Hair. Any of the 40 names in list_attr_celeba.txt"
    )
    spurious: Optional[str] = opt(
        None, "the attribute that defines the true groups with the target (evaluation only); None = Male"
    )


@DATASETS.register("celeba", keys=CelebaKeys, on_disk=True)
def scan_celeba(dspec) -> Scan:
    root = require_root(dspec, "celeba", "the folder with img_align_celeba/ and the attribute files")
    target, spurious = _pair(dspec)
    scan = Scan(root)
    if not root.is_dir():
        scan.add(
            "missing folder",
            f"dataset.root '{root}' is not a folder",
            f"set dataset.root to the folder holding {IMAGES}/, {ATTR_FILES[0]} and {PART_FILES[0]}",
        )
        return scan
    default_pair = (target, spurious) == (DEFAULT_TARGET, DEFAULT_SPURIOUS)
    if (root / "metadata.csv").is_file() and (default_pair or _first(root, ATTR_FILES, "Anno") is None):
        if not default_pair:
            scan.add(
                "missing attribute file",
                f"'{root}' has only metadata.csv (DFR's file: y = "
                f"{DEFAULT_TARGET}, place = {DEFAULT_SPURIOUS}), which cannot give {target} vs {spurious}",
                f"put {ATTR_FILES[0]} and {PART_FILES[0]} from {SOURCE} in {root}",
            )
            return scan
        m = scan_metadata_csv(
            scan,
            root,
            "DFR's celeba_metadata.csv (github.com/PolinaKirichenko/deep_feature_reweighting)",
            values={"y": (0, 1), "place": (0, 1)},
            spurious=("place",),
        )
        if m is not None:
            scan.notes.append(f"metadata.csv (DFR): y = {DEFAULT_TARGET}, place = {DEFAULT_SPURIOUS}")
            scan.table = {
                "paths": m["paths"],
                "y": m["y"],
                "split": m["split"],
                "group": 2 * m["y"] + m["spurious"],
                "group_names": group_names(DEFAULT_TARGET, DEFAULT_SPURIOUS),
                "n_classes": 2,
            }
        return scan
    attr_path = _index_file(scan, root, ATTR_FILES, "attribute", "Anno")
    part_path = _index_file(scan, root, PART_FILES, "partition", "Eval")
    img_dir = _image_dir(scan, root)
    if scan.findings:
        return scan
    attrs = read_attributes(attr_path, scan)
    part = read_partition(part_path, scan)
    if attrs is None or part is None:
        return scan
    names, files, values = attrs
    for key, want in (("dataset.target", target), ("dataset.spurious", spurious)):
        if want not in names:
            near = near_name(want, names)
            scan.add(
                "unknown attribute",
                f"spec key '{key}': '{want}' is not an attribute in '{attr_path}'"
                + (f" (did you mean '{near}'?)" if near else "")
                + f". Valid names: {', '.join(names)}",
                f"--set {key}=" + (near or "ONE_OF_THE_NAMES_ABOVE"),
            )
    if scan.findings:
        return scan
    unsplit = [f for f in files if f not in part]
    if unsplit:
        scan.add(
            "missing partition entry",
            f"{len(unsplit)} image(s) of '{attr_path}' have no line in "
            f"'{part_path}', e.g. {', '.join(unsplit[:MAX_LISTED])}",
            f"restore {part_path.name} from {SOURCE} (it lists all {len(files)} images)",
        )
        return scan
    paths = [img_dir / f for f in files]
    line0 = 3 if attr_path.suffix == ".txt" else 2
    missing_files(
        scan,
        [(f"{attr_path.name} line {line0 + i}", p) for i, p in enumerate(paths) if not p.is_file()],
        f"'{attr_path}'",
        f"re-extract img_align_celeba.zip into {root} (the images are {img_dir}/FILE)",
    )
    y = values[:, names.index(target)]
    s = values[:, names.index(spurious)]
    scan.notes.append(f"official attribute files: y = {target}, spurious = {spurious}; images in {img_dir}")
    scan.table = {
        "paths": paths,
        "y": y,
        "split": np.array([part[f] for f in files], dtype=np.int64),
        "group": 2 * y + s,
        "group_names": group_names(target, spurious),
        "n_classes": 2,
    }
    return scan
