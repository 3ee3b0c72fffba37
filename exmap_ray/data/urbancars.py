"""UrbanCars (Li et al., "A Whac-A-Mole Dilemma", CVPR 2023): two shortcuts at once; 8 groups.

    exmap-ray datasets check urbancars --root /data/urbancars
    exmap-ray run urbancars --set dataset.root=/data/urbancars

ROOT is the folder the Whac-A-Mole code reads as data/urbancars:

    bg-0.95_co_occur_obj-0.95/train/obj-{o}_bg-{b}_co_occur_obj-{c}/*.jpg
    bg-0.5_co_occur_obj-0.5/val/...    bg-0.5_co_occur_obj-0.5/test/...

with o, b, c in {urban, country}: the car type (the class), the background and a co-occurring object.
On train each shortcut agrees with the car type 95% of the time, on val and test 50%.

True groups (evaluation only) follow `dataset.group_by`: both = obj x bg x co-object (8), bg or
co_occur_obj (4 each), as the Whac-A-Mole code's group_label. Whatever the grouping, every split
carries the bg and co_occur_obj attributes, and test results get UrbanCars' shortcut gaps
(`urbancars_gaps`): accuracy where the background, the co-object or both disagree with the car type,
minus the in-distribution accuracy (the four agree/disagree accuracies weighted by the train ratios).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Literal

import numpy as np

from ..errors import near_name
from ..options import opt
from .base import DATASETS
from .layout import RootKeys, Scan, find_below, require_root

NAMES = ["urban", "country"]  # index = label, for obj, bg and co_occur_obj alike
RATIO_RE = re.compile(r"^bg-([0-9.]+)_co_occur_obj-([0-9.]+)$")
DEFAULT_RATIO_DIR = {
    "train": "bg-0.95_co_occur_obj-0.95",
    "val": "bg-0.5_co_occur_obj-0.5",
    "test": "bg-0.5_co_occur_obj-0.5",
}
SOURCE = "the UrbanCars archive (Whac-A-Mole; its authors share it on request, or generate it with their scripts)"


def group_folder(o: int, b: int, c: int) -> str:
    return f"obj-{NAMES[o]}_bg-{NAMES[b]}_co_occur_obj-{NAMES[c]}"


def urbancars_gaps(pred, y, attrs: dict, bg_ratio: float = 0.95, co_occur_obj_ratio: float = 0.95) -> dict:
    """UrbanCars' evaluation: in-distribution accuracy and the BG, CoObj and BG+CoObj gaps.

    A shortcut is "present" for a sample when its attribute equals the class. For each of the four
    (bg present?, co-object present?) cells, the accuracy is the mean over classes of the group
    accuracy. In-distribution accuracy weights the four cells by their train frequency
    (ratio or 1 - ratio for each shortcut); each gap is a cell's accuracy minus it:
    BG gap = (bg absent, co-object present), CoObj gap = (bg present, co-object absent),
    BG+CoObj gap = (both absent). Pure: arrays in, a dict of floats (None where a cell is empty) out.
    """
    pred, y = np.asarray(pred), np.asarray(y)
    bg, co = np.asarray(attrs["bg"]), np.asarray(attrs["co_occur_obj"])
    correct = pred == y

    def cell(bg_present: bool, co_present: bool) -> float | None:
        accs = []
        for c in np.unique(y):
            m = (y == c) & ((bg == c) == bg_present) & ((co == c) == co_present)
            if m.any():
                accs.append(float(correct[m].mean()))
        return float(np.mean(accs)) if accs else None

    cells = {(b, c): cell(b, c) for b in (True, False) for c in (True, False)}
    w = {
        (b, c): (bg_ratio if b else 1 - bg_ratio) * (co_occur_obj_ratio if c else 1 - co_occur_obj_ratio)
        for b, c in cells
    }
    known = {k: v for k, v in cells.items() if v is not None}
    id_acc = sum(v * w[k] for k, v in known.items()) / sum(w[k] for k in known) if known else None

    def gap(k):
        return None if cells[k] is None or id_acc is None else cells[k] - id_acc

    return {
        "id_acc": id_acc,
        "bg_gap": gap((False, True)),
        "co_occur_obj_gap": gap((True, False)),
        "both_gap": gap((False, False)),
        "acc_bg_present_coobj_present": cells[(True, True)],
        "acc_bg_absent_coobj_present": cells[(False, True)],
        "acc_bg_present_coobj_absent": cells[(True, False)],
        "acc_bg_absent_coobj_absent": cells[(False, False)],
    }


def _ratio_dirs(root) -> list:
    return sorted(d for d in root.iterdir() if d.is_dir() and RATIO_RE.match(d.name))


def _split_dir(scan: Scan, root, dirs: list, split: str):
    holders = [d for d in dirs if (d / split).is_dir()]
    if len(holders) == 1:
        return holders[0] / split
    if len(holders) > 1:
        default = [d for d in holders if d.name == DEFAULT_RATIO_DIR[split]]
        if default:
            return default[0] / split
        scan.add(
            "ambiguous folder",
            f"several folders have a {split}/ subfolder: {', '.join(d.name for d in holders)}",
            f"keep one of them in {root} (the Whac-A-Mole layout has {DEFAULT_RATIO_DIR[split]}/{split})",
        )
        return None
    want = root / DEFAULT_RATIO_DIR[split] / split
    misnamed = sorted(d for d in root.iterdir() if d.is_dir() and not RATIO_RE.match(d.name) and (d / split).is_dir())
    if misnamed:
        scan.add(
            "wrong folder name",
            f"'{misnamed[0]}/' holds {split}/, but its name is not bg-RATIO_co_occur_obj-RATIO",
            f"rename '{misnamed[0]}' to '{root / DEFAULT_RATIO_DIR[split]}'",
        )
        return None
    where = [d for d in dirs if d.name == DEFAULT_RATIO_DIR[split]] or dirs
    near = next(
        (
            f"{d.name}/{h}"
            for d in where
            if (h := near_name(split, [p.name for p in d.iterdir() if p.is_dir()])) is not None
        ),
        None,
    )
    if near:
        scan.renamed("wrong folder name", want, root / near, folder=True, rename_to=root / near.split("/")[0] / split)
    else:
        scan.add(
            "missing folder",
            f"no {split}/ folder under any bg-*_co_occur_obj-* folder of '{root}'",
            f"restore '{want}/' from {SOURCE}",
        )
    return None


@dataclass
class UrbanCarsKeys(RootKeys):
    """UrbanCars' own spec keys (dataset.*): the folder and which shortcuts define the true groups."""

    group_by: Literal["both", "bg", "co_occur_obj"] = opt(
        "both",
        "the shortcut(s) that define the true groups: both (8 groups), bg or co_occur_obj (4 each). "
        "Changes the oracle DFR row and the true-group WGA; the shortcut gaps use both always",
    )


@DATASETS.register("urbancars", keys=UrbanCarsKeys, on_disk=True)
def scan_urbancars(dspec) -> Scan:
    root = require_root(
        dspec, "urbancars", "the folder holding bg-0.95_co_occur_obj-0.95/ and bg-0.5_co_occur_obj-0.5/"
    )
    scan = Scan(root)
    if not root.is_dir():
        scan.add(
            "missing folder",
            f"dataset.root '{root}' is not a folder",
            "set dataset.root to the folder holding bg-0.95_co_occur_obj-0.95/ and bg-0.5_co_occur_obj-0.5/",
        )
        return scan
    dirs = _ratio_dirs(root)
    if not dirs:
        inner = find_below(root, DEFAULT_RATIO_DIR["train"])
        subdirs = [p.name for p in root.iterdir() if p.is_dir()]
        near = near_name(DEFAULT_RATIO_DIR["train"], subdirs)
        if inner is not None:
            scan.add(
                "wrong folder",
                f"'{root}' has no bg-*_co_occur_obj-* folder, but '{inner}' has",
                f"set dataset.root={inner}",
            )
        elif near:
            scan.renamed("wrong folder name", root / DEFAULT_RATIO_DIR["train"], root / near, folder=True)
        else:
            scan.add(
                "missing folder",
                f"'{root}' has no bg-*_co_occur_obj-* folder",
                f"set dataset.root to the urbancars folder of {SOURCE}",
            )
        return scan
    rows = []  # (path, split, obj, bg, co)
    split_dirs = {}
    for code, split in enumerate(("train", "val", "test")):
        sd = _split_dir(scan, root, dirs, split)
        if sd is None:
            continue
        split_dirs[split] = sd
        present = [p.name for p in sd.iterdir() if p.is_dir()]
        for o in (0, 1):
            for b in (0, 1):
                for c in (0, 1):
                    name = group_folder(o, b, c)
                    d = sd / name
                    if not d.is_dir():
                        near = near_name(
                            name,
                            [
                                p
                                for p in present
                                if not RATIO_RE.match(p) and p not in {group_folder(*t) for t in np.ndindex(2, 2, 2)}
                            ],
                        )
                        if near:
                            scan.renamed("wrong folder name", d, sd / near, folder=True)
                        else:
                            scan.add("missing folder", f"'{d}/' not found", f"restore it from {SOURCE}")
                        continue
                    files = sorted(d.glob("*.jpg"))
                    if not files:
                        others = sorted(p.name for p in d.iterdir())[:3]
                        scan.add(
                            "empty folder",
                            f"'{d}/' holds no .jpg files" + (f" (it has {', '.join(others)})" if others else ""),
                            f"restore its images from {SOURCE}; UrbanCars images are .jpg",
                        )
                    rows += [(p, code, o, b, c) for p in files]
    if scan.findings:
        return scan
    paths = [r[0] for r in rows]
    split, obj, bg, co = (np.array([r[i] for r in rows], dtype=np.int64) for i in (1, 2, 3, 4))
    ratio = RATIO_RE.match(split_dirs["train"].parent.name)
    bg_ratio, co_ratio = float(ratio.group(1)), float(ratio.group(2))
    by = dspec.group_by
    if by == "both":
        group = obj * 4 + bg * 2 + co
        names = [f"{NAMES[o]} car, {NAMES[b]} bg, {NAMES[c]} coobj" for o in (0, 1) for b in (0, 1) for c in (0, 1)]
    else:
        attr = bg if by == "bg" else co
        group = obj * 2 + attr
        label = "bg" if by == "bg" else "coobj"
        names = [f"{NAMES[o]} car, {NAMES[a]} {label}" for o in (0, 1) for a in (0, 1)]
    scan.notes.append(
        f"train from {split_dirs['train'].parent.name} (bg ratio {bg_ratio}, co-object ratio "
        f"{co_ratio}); true groups by {by}"
    )
    scan.extras["shortcut_metrics"] = functools.partial(urbancars_gaps, bg_ratio=bg_ratio, co_occur_obj_ratio=co_ratio)
    scan.table = {
        "paths": paths,
        "y": obj,
        "split": split,
        "group": group,
        "group_names": names,
        "n_classes": 2,
        "attrs": {"bg": bg, "co_occur_obj": co},
    }
    return scan
