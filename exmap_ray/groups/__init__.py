"""Val groupings retraining uses: the group sources (ExMap and its baselines, `GROUP_SOURCES`) and
pseudo-group formation (class x cluster, merging small and easy groups).

    from exmap_ray.groups import GroupContext, infer_groups
    groups, info = infer_groups("exmap", GroupContext(y_val=y, clustering=spec.clustering, seed=0, heatmaps=H))

sources.py    the registry (`groups.source`) and the built-in sources: exmap, features, jtt_error_set, random, true
formation.py  pseudo_groups (class x cluster), the input checks, cross_spatial, merge_small, merge_easy_groups
peers.py      SpuCo's GEORGE, SPARE and EIIL (the `peers` extra), registered by plugins.py
"""

from .formation import class_by_cluster, merge_easy_groups, pseudo_groups
from .sources import GROUP_SOURCES, GroupContext, GroupSource, infer_groups

__all__ = [
    "GROUP_SOURCES",
    "GroupContext",
    "GroupSource",
    "class_by_cluster",
    "infer_groups",
    "merge_easy_groups",
    "pseudo_groups",
]
