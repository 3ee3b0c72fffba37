"""Dataset registry.  `build_dataset(spec.dataset, seed)` returns a `GroupData`.

    exmap-ray datasets        # list the registered datasets

Group labels are carried for evaluation only: training, heatmaps, clustering
and model selection in ExMap see `images` and `y`, never `group`.
"""
from .base import DATASETS, GroupData, Split, build_dataset
from . import cmnist, folder  # noqa: F401  (register)

__all__ = ["DATASETS", "GroupData", "Split", "build_dataset"]
