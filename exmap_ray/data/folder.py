"""The group_DRO / Waterbirds folder layout: ROOT/metadata.csv and the images it lists.

    exmap-ray datasets check folder --root /data/waterbird_complete95_forest2water2
    exmap-ray run folder --set dataset.root=/data/waterbird_complete95_forest2water2

ROOT/metadata.csv has the columns
- `img_filename`: the image path relative to ROOT;
- `y`: the class, 0..C-1;
- `split`: 0 train, 1 val, 2 test;
- `place` or `spurious`: the spurious attribute, 0..S-1 (evaluation only);
- optionally `group`, which overrides group = y * S + spurious.

`scan_metadata_csv` reads that file for every dataset that ships one (folder, waterbirds, metashift's
and CelebA's DFR variants). The whole table is checked before any training: missing columns, bad
values (by line), missing image files, empty splits and single-class splits are findings that name
the file and the fix (`exmap-ray datasets check` lists them all). The images then take the shared path
(images.py) with the val/test decode cache; `folder` resizes every split to S x S (no crop, no
augmentation), the benchmarks use the paper's transforms.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import near_name
from .images import RESIZE
from .base import DATASETS
from .layout import MAX_LISTED, SPLIT_NAMES, Scan, missing_files, require_root, root_problem

SPURIOUS = ("place", "spurious")
SOURCE = "the dataset's original index"


def _as_int(v) -> Optional[int]:
    try:
        f = float(str(v).strip())
    except ValueError:
        return None
    return int(f) if f.is_integer() else None


def _columns(header: list[str], spurious: tuple, source: str, scan: Scan, meta: Path) -> Optional[str]:
    """Each missing column is a finding (with the near name to rename, if any); returns the spurious column."""
    s_col = next((c for c in spurious if c in header), None)
    others = [h for h in header if h not in ("img_filename", "y", "split") + spurious]
    for names in [(c,) for c in ("img_filename", "y", "split") if c not in header] + (
        [spurious] if s_col is None else []
    ):
        label = " or ".join(f"'{n}'" for n in names)
        near = next(((n, x) for x in names if (n := near_name(x, others))), None)
        fix = (
            f"rename the column '{near[0]}' to '{near[1]}' in the first line of {meta}"
            if near
            else f"restore {meta} from {source}; it needs the columns img_filename, y, split, " + " or ".join(spurious)
        )
        scan.add("missing column", f"'{meta}' has no column {label} (its header: {', '.join(header)})", fix)
    return s_col


def scan_metadata_csv(
    scan: Scan, root: Path, source: str = SOURCE, values: dict | None = None, spurious: tuple = SPURIOUS
) -> Optional[dict]:
    """Check and read ROOT/metadata.csv (img_filename, y, split, `spurious`[0] or [1], optional group).

    `values` limits columns to given values (Waterbirds: y and place in 0/1); otherwise y and the
    spurious attribute are any integers >= 0. Returns paths, y, split, group, group_names, n_classes and
    spurious as arrays, or None with the findings in `scan`."""
    meta = root / "metadata.csv"
    with open(meta, newline="") as f:
        reader = csv.DictReader(f)
        header = list(reader.fieldnames or [])
        rows = list(reader)
    s_col = _columns(header, spurious, source, scan, meta)
    if scan.findings:
        return None
    if not rows:
        scan.add("empty index", f"'{meta}' has a header but no rows", f"restore {meta} from {source}")
        return None
    allowed = {"split": (0, 1, 2), **(values or {})}
    for col in ["split", "y", s_col] + (["group"] if "group" in header else []):
        ok = allowed.get(col if col != s_col else spurious[0])
        bad = [
            (i + 2, r[col])
            for i, r in enumerate(rows)
            if (v := _as_int(r[col])) is None or (v not in ok if ok else v < 0)
        ]
        if bad:
            shown = ", ".join(f"line {ln} has {v!r}" for ln, v in bad[:MAX_LISTED])
            more = f" and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
            what = (
                "0 (train), 1 (val) or 2 (test)"
                if col == "split"
                else " or ".join(map(str, ok))
                if ok
                else "an integer >= 0"
            )
            scan.add(
                f"bad {col} value",
                f"'{meta}' column '{col}': {shown}{more}",
                f"set column '{col}' on those lines of {meta} to {what}"
                + (f" (or restore the file from {source})" if col != "split" else ""),
            )
    if scan.findings:
        return None
    split, y, s = (np.array([_as_int(r[c]) for r in rows], dtype=np.int64) for c in ("split", "y", s_col))
    paths = [root / r["img_filename"] for r in rows]
    missing_files(
        scan,
        [(f"line {i + 2}", p) for i, p in enumerate(paths) if not p.is_file()],
        f"'{meta}'",
        f"restore those files from {source}, or delete their lines from {meta}",
    )
    for code, name in enumerate(SPLIT_NAMES):
        if not (split == code).any():
            scan.add(
                "empty split",
                f"'{meta}': the {name} split (split == {code}) is empty",
                f"give some rows split {code}, or restore {meta} from {source}",
            )
    for code in (0, 1):  # ERM trains on train; clustering and DFR work per class on val
        classes = np.unique(y[split == code])
        if len(classes) == 1:
            scan.add(
                "single class",
                f"'{meta}': the {SPLIT_NAMES[code]} split has a single class (column 'y' "
                f"is {classes[0]} on every split == {code} row)",
                "a classifier needs at least two: give that split rows of another class",
            )
    if scan.findings:
        return None
    n_s = int(s.max()) + 1
    if "group" in header:
        group = np.array([_as_int(r["group"]) for r in rows], dtype=np.int64)
        names = [f"group {g}" for g in range(int(group.max()) + 1)]
    else:
        group = y * n_s + s
        names = [f"y={g // n_s} {s_col}={g % n_s}" for g in range(int(group.max()) + 1)]
    return {
        "paths": paths,
        "y": y,
        "split": split,
        "group": group,
        "group_names": names,
        "n_classes": int(y.max()) + 1,
        "spurious": s,
    }


# a plain resize for every split, as before (docs/datasets.md)
@DATASETS.register("folder", on_disk=True, transforms=RESIZE)
def scan_folder(dspec) -> Scan:
    """Any dataset in the group_DRO / Waterbirds layout: ROOT/metadata.csv and the images it lists."""
    root = require_root(dspec, "folder", "a folder with metadata.csv and the images")
    scan = Scan(root)
    if not root_problem(scan, root, "metadata.csv", None):
        return scan
    m = scan_metadata_csv(scan, root)
    if m is not None:
        scan.notes.append(f"metadata.csv: {m['n_classes']} classes, {len(m['group_names'])} true groups")
        scan.table = m
    return scan
