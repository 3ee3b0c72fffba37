"""Every module that registers plugins. Importing this fills every registry, so a spec read after it
has each registry-named key (dataset.name, heatmaps.method, clustering.method, groups.source,
retrain.method) checked against what is registered (registry.for_key). The CLI imports it before it
reads a spec; a new plugin module is added here once.
"""

from . import clustering, data, groups, heatmaps, retrain  # noqa: F401  (register)
from .groups import peers  # noqa: F401  (SpuCo's sources, registered when spuco is installed)

__all__ = ["clustering", "data", "groups", "heatmaps", "peers", "retrain"]
