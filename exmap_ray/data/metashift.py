"""MetaShift cats vs dogs (Liang & Zou, ICLR 2022), indoor/outdoor context as the shortcut; 4 groups.

    exmap-ray datasets check metashift --root /data/MetaShift-Cat-Dog-indoor-outdoor
    exmap-ray run metashift --set dataset.root=/data/MetaShift-Cat-Dog-indoor-outdoor

ROOT is the `MetaShift-Cat-Dog-indoor-outdoor` folder of the metashift.tar.gz that SubpopBench
("Change is hard", Yang et al., ICML 2023) and the spurious_feature_learning code download:

    train/cat/cat(indoor)/*.jpg    cat, indoor     train/dog/dog(outdoor)/*.jpg   dog, outdoor
    test/cat/cat(outdoor)/*.jpg    cat, outdoor    test/dog/dog(indoor)/*.jpg     dog, indoor

The folders' train/test names are not the split: that code pools the four folders and draws
test 25% / val 10% / train the rest at random (seed 42). Here:
- if ROOT/metadata.csv exists (img_filename relative to ROOT, y, split, place, as that code's
  generate_metadata_metashift writes it), its split is used: use it to compare with published numbers;
- else the split is drawn here: per group, files sorted by name, seed 42, 25% test and 10% val
  (at least 2 each). Deterministic, but not the same draw as theirs (their glob order is the
  filesystem's), and stratified by group so every group is in every split.

y: 0 dog, 1 cat; place: 0 outdoor, 1 indoor; true group = 2 * y + place (evaluation only).
"""

from __future__ import annotations

import numpy as np

from ..errors import near_name
from .folder import scan_metadata_csv
from .base import DATASETS
from .layout import Scan, find_below, require_root, root_problem

FOLDER = "MetaShift-Cat-Dog-indoor-outdoor"
# folder -> (y, place), as in the public generate_metadata_metashift
DIRS = {
    "train/cat/cat(indoor)": (1, 1),
    "train/dog/dog(outdoor)": (0, 0),
    "test/cat/cat(outdoor)": (1, 0),
    "test/dog/dog(indoor)": (0, 1),
}
GROUP_NAMES = ["dog outdoor", "dog indoor", "cat outdoor", "cat indoor"]
TEST_SHARE, VAL_SHARE, SPLIT_SEED = 0.25, 0.10, 42
SOURCE = "metashift.tar.gz (the MetaShift-Cat-Dog-indoor-outdoor archive SubpopBench downloads)"


def _group_dir(scan: Scan, root, rel: str):
    d = root / rel
    if d.is_dir():
        return d
    parent = d.parent
    while not parent.is_dir() and parent != root:  # the nearest folder that exists
        parent = parent.parent
    existing = [p.relative_to(root).as_posix() for p in parent.rglob("*") if p.is_dir()] if parent.is_dir() else []
    near = near_name(rel, existing)
    if near:
        scan.renamed("wrong folder name", root / rel, root / near, folder=True)
    else:
        scan.add(
            "missing folder",
            f"'{root / rel}/' not found",
            f"re-extract {SOURCE}; ROOT needs the folders {', '.join(DIRS)}",
        )
    return None


def stratified_split(group: np.ndarray, seed: int = SPLIT_SEED) -> np.ndarray:
    """0/1/2 per sample: per group, a seeded shuffle; 25% test, 10% val (each at least 2), rest train."""
    rng = np.random.RandomState(seed)
    split = np.zeros(len(group), dtype=np.int64)
    for g in np.unique(group):
        idx = np.flatnonzero(group == g)
        idx = idx[rng.permutation(len(idx))]
        n_test = max(2, int(round(len(idx) * TEST_SHARE)))
        n_val = max(2, int(round(len(idx) * VAL_SHARE)))
        split[idx[:n_test]] = 2
        split[idx[n_test : n_test + n_val]] = 1
    return split


@DATASETS.register("metashift", on_disk=True)
def scan_metashift(dspec) -> Scan:
    root = require_root(dspec, "metashift", f"the {FOLDER} folder")
    scan = Scan(root)
    if (root / "metadata.csv").is_file():
        m = scan_metadata_csv(
            scan,
            root,
            f"{SOURCE} plus generate_metadata_metashift",
            values={"y": (0, 1), "place": (0, 1)},
            spurious=("place",),
        )
        if m is not None:
            scan.notes.append("metadata.csv: its split; y 0 dog / 1 cat, place 0 outdoor / 1 indoor")
            scan.table = {
                "paths": m["paths"],
                "y": m["y"],
                "split": m["split"],
                "group": 2 * m["y"] + m["spurious"],
                "group_names": GROUP_NAMES,
                "n_classes": 2,
            }
        return scan
    if root.is_dir() and not (root / "train").is_dir() and not (root / "test").is_dir():
        inner = find_below(root, "train/cat")
        if inner is not None:
            scan.add("wrong folder", f"'{root}' has no train/ or test/, but '{inner}' has", f"set dataset.root={inner}")
            return scan
    if not root_problem(scan, root, "train", FOLDER, archive_hint=f"it is {SOURCE}"):
        return scan
    paths, ys, places = [], [], []
    for rel, (y, place) in DIRS.items():
        d = _group_dir(scan, root, rel)
        if d is None:
            continue
        files = sorted(d.glob("*.jpg"))
        if not files:
            others = sorted(p.name for p in d.iterdir())[:3]
            scan.add(
                "empty folder",
                f"'{d}/' holds no .jpg files" + (f" (it has {', '.join(others)})" if others else ""),
                f"re-extract {SOURCE}; the images are .jpg",
            )
        paths += files
        ys += [y] * len(files)
        places += [place] * len(files)
    if scan.findings:
        return scan
    y, place = np.asarray(ys, dtype=np.int64), np.asarray(places, dtype=np.int64)
    group = 2 * y + place
    scan.notes.append("no metadata.csv: split drawn per group (seed 42, 25% test, 10% val)")
    scan.table = {
        "paths": paths,
        "y": y,
        "split": stratified_split(group),
        "group": group,
        "group_names": GROUP_NAMES,
        "n_classes": 2,
    }
    return scan
