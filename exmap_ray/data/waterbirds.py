"""Waterbirds (Sagawa et al., ICLR 2020): CUB birds pasted onto Places backgrounds; 4 groups.

    exmap-ray datasets check waterbirds --root /data/waterbird_complete95_forest2water2
    exmap-ray run waterbirds --set dataset.root=/data/waterbird_complete95_forest2water2

ROOT is the `waterbird_complete95_forest2water2` folder from the group_DRO tarball: the bird-species
folders (`001.Black_footed_Albatross/...jpg`) and `metadata.csv` with img_id, img_filename, y
(0 landbird, 1 waterbird), split (0 train, 1 val, 2 test), place (0 land, 1 water), place_filename.
It is the `folder` layout (folder.scan_metadata_csv reads it) with y and place in 0/1 and the group
names; the images take the shared path (images.py). True group = 2 * y + place (evaluation only).
"""

from __future__ import annotations

from .folder import scan_metadata_csv
from .base import DATASETS
from .layout import Scan, require_root, root_problem

FOLDER = "waterbird_complete95_forest2water2"
GROUP_NAMES = ["landbird on land", "landbird on water", "waterbird on land", "waterbird on water"]
SOURCE = "the group_DRO Waterbirds tarball (waterbird_complete95_forest2water2.tar.gz)"


@DATASETS.register("waterbirds", on_disk=True)
def scan_waterbirds(dspec) -> Scan:
    root = require_root(dspec, "waterbirds", f"the {FOLDER} folder")
    scan = Scan(root)
    if not root_problem(
        scan,
        root,
        "metadata.csv",
        FOLDER,
        archive_hint="the group_DRO README links waterbird_complete95_forest2water2.tar.gz",
    ):
        return scan
    m = scan_metadata_csv(scan, root, SOURCE, values={"y": (0, 1), "place": (0, 1)}, spurious=("place",))
    if m is None:
        return scan
    scan.notes.append("metadata.csv: y 0 landbird / 1 waterbird, place 0 land / 1 water")
    scan.table = {
        "paths": m["paths"],
        "y": m["y"],
        "split": m["split"],
        "group": 2 * m["y"] + m["spurious"],
        "group_names": GROUP_NAMES,
        "n_classes": 2,
    }
    return scan
