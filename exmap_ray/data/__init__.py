"""Dataset registry: one `DatasetEntry` per dataset in `DATASETS` (its builder and, on disk, its layout
scanner). `build_dataset(spec.dataset, seed)` returns a `GroupData`.

    exmap-ray datasets        # list the registered datasets
    exmap-ray datasets check NAME --root PATH   # verify an on-disk dataset (exmap_ray/data/layout.py)

Group labels are carried for evaluation only: training, heatmaps, clustering
and model selection in ExMap see `images` and `y`, never `group`.
"""

from .base import DATASETS, DatasetEntry, GroupData, Split
from . import cmnist, cmnist_multi, folder, zoo  # noqa: F401  (register)
from . import celeba, metashift, urbancars, waterbirds  # noqa: F401  (register: on-disk benchmarks)
from .layout import build_dataset, check_before_run, check_dataset

__all__ = ["DATASETS", "DatasetEntry", "GroupData", "Split", "build_dataset", "check_before_run", "check_dataset"]
