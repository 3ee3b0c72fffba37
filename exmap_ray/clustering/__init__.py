"""Clustering any (N, d) rows: the k-means, the spectral maths, the scalable anchor route and the clusterer
registry. Nothing here is specific to heatmaps; pseudo-group formation (class x cluster) is groups/formation.py.

    from exmap_ray.clustering import CLUSTERERS, cluster
    labels, info = cluster(X, spec.clustering, seed=0)

kmeans.py     k-means (FAISS, or the joint-restart Lloyd above SCALE_MIN_N on the CPU)
spectral.py   kNN graph, normalised Laplacian spectrum, eigengap k (the paper's)
scale.py      the anchor-graph route above SCALE_MIN_N points per scope (rows read by ../chunked.py)
clusterers.py the registry (`clustering.method`) and `cluster`, which picks the exact or scalable route
"""

from ..chunked import ChunkedRows, normalize_rows
from .clusterers import CLUSTERERS, SCALABLE, candidate_ks, cluster
from .kmeans import kmeans, kmeans_joint, kmeanspp_init
from .scale import SCALE_MIN_N, anchor_spectrum
from .spectral import N_EIGS, eigengap_k, knn_affinity, laplacian_spectrum

__all__ = [
    "CLUSTERERS",
    "N_EIGS",
    "ChunkedRows",
    "SCALABLE",
    "SCALE_MIN_N",
    "anchor_spectrum",
    "candidate_ks",
    "cluster",
    "eigengap_k",
    "kmeans",
    "kmeans_joint",
    "kmeanspp_init",
    "knn_affinity",
    "laplacian_spectrum",
    "normalize_rows",
]
