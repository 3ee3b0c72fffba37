"""The clusterer registry, `CLUSTERERS`, its entries, and `cluster`: one scope's rows -> labels.

    from exmap_ray.clustering import cluster
    labels, info = cluster(X, spec.clustering, seed=0)

`clustering.method` names a registered clusterer:
- `kmeans`: FAISS k-means on *all* points (FAISS samples 256*k points unless
  told otherwise), on the GPU when a FAISS GPU build sees one. k = auto uses
  the eigengap estimate below (unchanged, so earlier runs reproduce).
- `spectral` (the paper): a symmetric kNN graph with k_nn = int(ln N), the
  normalised Laplacian's 13 smallest eigenvalues, k = argmax eigengap over
  2..k_max, then k-means on the row-normalised eigenvectors.
- `kmeans_silhouette` (GEORGE / SpuCo): k-means for each k in 2..k_max, the
  best silhouette wins (k = auto); an integer k is plain k-means.
- `gmm`: diagonal-covariance Gaussian mixture (sklearn), k = auto by lowest BIC
  over 2..k_max.
Nothing here is specific to heatmaps: the same call clusters penultimate
features (`clustering.input: features`, or the `features` group source).

A scope of `SCALE_MIN_N` points or more, given as `ChunkedRows`, takes the scalable route for `spectral`
(and `kmeans`'s k = auto): the anchor-graph spectrum of scale.py, streamed in chunks, never a whole copy.
Below it the exact path runs unchanged (docs/cluster_scale.md has the measured agreement and times).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from ..errors import SpecError, UserError
from ..options import opt, positive
from ..registry import Registry
from .kmeans import kmeans
from . import scale
from .scale import ChunkedRows, anchor_spectrum
from .spectral import N_EIGS, eigengap_k, knn_affinity, laplacian_spectrum

SILHOUETTE_SAMPLE = 4000  # kmeans_silhouette scores at most this many points (silhouette is O(n^2))
GMM_MAX_ITER = 200
GMM_REG_COVAR = 1e-3  # gmm variance floor, as a fraction of the mean per-dimension variance


CLUSTERERS: Registry = Registry("clusterer", "clustering.method")
"""name -> fn(X (n, d) float32, cspec, seed) -> (labels (n,) int64 in 0..k-1, info with at least "k").

`cspec` is a `spec.ClusteringSpec`; `cspec.k` is an int or "auto" (each clusterer says how it picks
k), `cspec.k_max` bounds the search. X may be heatmaps or features: clusterers only see rows."""


def check_k(k: int, n: int, where: str = "a scope") -> None:
    """The one check of an integer clustering.k against the points it clusters: `pipeline.preflight` calls
    it before any Ray work (with the data's smallest scope), each clusterer again on what it is given."""
    if k > n:
        raise SpecError(
            f"spec key 'clustering.k': {k} clusters but {where} has only {n} val points; use an "
            f"integer in 2..{n}, or 'auto'"
        )


def _eigengap(X: np.ndarray, cspec, info: dict):
    eigvals, V = laplacian_spectrum(knn_affinity(X))
    info["eigenvalues"] = [round(float(v), 6) for v in eigvals]
    return (eigengap_k(eigvals, cspec.k_max) if cspec.k == "auto" else cspec.k), V


@CLUSTERERS.register("spectral")
def spectral_clusters(X: np.ndarray, cspec, seed: int) -> tuple[np.ndarray, dict]:
    (
        """The paper: kNN graph, normalised Laplacian, k by eigengap (k=auto), k-means on the row-normalised """
        """eigenvectors."""
    )  # one docstring line, kept whole: its first line is the clusterer's summary
    info: dict = {}
    k, V = _eigengap(X, cspec, info)
    check_k(k, len(X))
    info["k"] = int(k)
    if k > V.shape[1]:
        _, V = laplacian_spectrum(knn_affinity(X), n_eig=k + 1)
    emb = V[:, :k]
    emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    return kmeans(emb.astype(np.float32), k, cspec.niter, cspec.nredo, seed), info


@dataclass
class SpectralSplitKeys:
    """spectral_split's own keys, in `clustering:` beside the keys every clusterer takes (each neutral at
    the value the code used before the key existed, so stage keys made before stay valid)."""

    split_gap: float = opt(
        0.1,
        "spectral_split: split a cluster again only while its relative eigengap "
        "(lambda_k+1 - lambda_k) / lambda_k+1 is at least this",
        positive,
        neutral=0.1,
    )
    split_depth: int = opt(
        2,
        "spectral_split: levels of clustering, the first included (1 = spectral alone, "
        "2 = each of its clusters may be split once more)",
        positive,
        neutral=2,
    )
    split_min_size: int = opt(
        15,
        "spectral_split: a part under twice this is not split, nor split into a child under half of it",
        positive,
        neutral=15,
    )


@CLUSTERERS.register("spectral_split", keys=SpectralSplitKeys)
def spectral_split_clusters(X: np.ndarray, cspec, seed: int) -> tuple[np.ndarray, dict]:
    """`spectral`, then each of its clusters is clustered again by its own eigengap k, while the gap is clear.

    The first level is `spectral` as configured (`clustering.k`). Below it, a part is split when fewer
    than `split_depth` levels are used, it holds at least 2 x `split_min_size` points, its relative
    eigengap (lambda_k+1 - lambda_k) / lambda_k+1 is at least `split_gap`, and no child would hold
    fewer than half of `split_min_size`; otherwise it is a final cluster. A second shortcut whose
    minority the first eigengap merged into a larger cluster can then still get clusters of its own.
    """
    if len(X) >= scale.SCALE_MIN_N:
        raise UserError(
            f"clustering.method spectral_split builds the exact kNN graph at every level and takes "
            f"scopes of under {scale.SCALE_MIN_N:,} points; this one has {len(X):,}. Use "
            f"clustering.method: spectral (its anchor-graph route scales), or clustering.scope: local"
        )
    auto = dataclasses.replace(cspec, k="auto")
    parts: list[np.ndarray] = []
    splits: list[dict] = []

    def split(idx: np.ndarray, depth: int, s: int) -> None:
        if depth >= cspec.split_depth or (depth > 0 and len(idx) < 2 * cspec.split_min_size):
            parts.append(idx)
            return
        labels, sub = spectral_clusters(X[idx], cspec if depth == 0 else auto, s)
        w, k = sub["eigenvalues"], sub["k"]
        gap = (w[k] - w[k - 1]) / max(w[k], 1e-12) if k < len(w) else None  # (a set k beyond the spectrum)
        if depth > 0 and (
            gap is None or gap < cspec.split_gap or np.bincount(labels, minlength=k).min() < cspec.split_min_size // 2
        ):
            parts.append(idx)
            return
        splits.append({"depth": depth, "n": int(len(idx)), "k": int(k), "gap": None if gap is None else round(gap, 6)})
        for c in range(k):
            split(idx[labels == c], depth + 1, s + 7 * c + 1)

    split(np.arange(len(X)), 0, seed)
    labels = np.zeros(len(X), np.int64)
    for j, idx in enumerate(parts):
        labels[idx] = j
    # k: the final clusters; k_first: the first level's (clustering.k, or its eigengap)
    return labels, {"k": len(parts), "k_first": splits[0]["k"], "splits": splits}


@CLUSTERERS.register("kmeans")
def kmeans_clusters(X: np.ndarray, cspec, seed: int) -> tuple[np.ndarray, dict]:
    """FAISS k-means on the rows; k=auto takes the eigengap estimate (kept so that earlier runs reproduce)."""
    info: dict = {}
    k = _eigengap(X, cspec, info)[0] if cspec.k == "auto" else cspec.k
    check_k(k, len(X))
    info["k"] = int(k)
    return kmeans(X, k, cspec.niter, cspec.nredo, seed), info


def _anchor_k(rows: ChunkedRows, cspec, seed: int, info: dict):
    """The scalable `_eigengap`: the anchor graph's spectrum (see scale.py)."""
    n_eig = N_EIGS if cspec.k == "auto" else max(N_EIGS, int(cspec.k) + 1)
    spec = anchor_spectrum(rows, seed, n_eig=n_eig)
    info.update(route="anchor", anchors=spec.anchors, eigenvalues=[round(float(v), 6) for v in spec.eigenvalues])
    k = eigengap_k(spec.eigenvalues, cspec.k_max) if cspec.k == "auto" else cspec.k
    check_k(k, len(rows))
    info["k"] = int(k)
    return k, spec


def _spectral_anchor(rows: ChunkedRows, cspec, seed: int) -> tuple[np.ndarray, dict]:
    """`spectral` above SCALE_MIN_N: the anchor graph's eigenvectors, row-normalised, then k-means."""
    info: dict = {}
    k, spec = _anchor_k(rows, cspec, seed, info)
    emb = spec.embed(k)
    emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    return kmeans(emb, k, cspec.niter, cspec.nredo, seed), info


def _kmeans_large(rows: ChunkedRows, cspec, seed: int) -> tuple[np.ndarray, dict]:
    """`kmeans` above SCALE_MIN_N: k = auto from the anchor spectrum; FAISS k-means on one copy of the rows."""
    info: dict = {}
    k = _anchor_k(rows, cspec, seed, info)[0] if cspec.k == "auto" else cspec.k
    check_k(k, len(rows))
    info["k"] = int(k)
    return kmeans(rows.materialize(), k, cspec.niter, cspec.nredo, seed), info


SCALABLE = {"spectral": _spectral_anchor, "kmeans": _kmeans_large}
"""Clusterers with a route for scopes of SCALE_MIN_N points or more; the others cluster one in-memory copy."""


def candidate_ks(cspec, n: int) -> list[int]:
    """k = auto searches 2..min(k_max, n - 1); an integer k is the only candidate."""
    if cspec.k != "auto":
        check_k(cspec.k, n)
        return [int(cspec.k)]
    return list(range(2, max(2, min(cspec.k_max, n - 1)) + 1))


@CLUSTERERS.register("kmeans_silhouette")
def kmeans_silhouette_clusters(X: np.ndarray, cspec, seed: int) -> tuple[np.ndarray, dict]:
    """GEORGE / SpuCo style: FAISS k-means for each k in 2..k_max, keep the k with the best silhouette.

    The silhouette (Euclidean) is computed on at most SILHOUETTE_SAMPLE points, so it stays cheap
    on large scopes. With an integer k this is plain k-means.
    """
    ks = candidate_ks(cspec, len(X))
    runs = {k: kmeans(X, k, cspec.niter, cspec.nredo, seed) for k in ks}
    if len(ks) == 1:
        return runs[ks[0]], {"k": ks[0]}
    scores = silhouettes(X, runs, SILHOUETTE_SAMPLE, seed)
    best = max(ks, key=lambda k: (scores[k], -k))  # ties: the smaller k
    return runs[best], {"k": int(best), "silhouette": {str(k): round(v, 6) for k, v in scores.items()}}


def silhouettes(X: np.ndarray, runs: dict, sample_size: int, seed: int) -> dict:
    """The mean silhouette (Euclidean) of each labelling in `runs`, as sklearn's `silhouette_score(X, labels,
    sample_size=min(n, sample_size), random_state=seed)` gives it (the same sample of points), but with the
    sample's distance matrix computed once for every labelling, not once per labelling: the per-cluster sums
    of distances are one product with the labels' indicator matrix. A labelling with a single cluster among
    the sampled points scores -1. Equal to sklearn's to float32 rounding (tests/test_clusterers.py)."""
    from sklearn.metrics import pairwise_distances

    n = len(X)
    idx = np.random.RandomState(seed).permutation(n)[: min(n, sample_size)]  # sklearn's sample
    D = pairwise_distances(X[idx]).astype(np.float64)  # zero diagonal, as sklearn's
    out = {}
    for k, labels in runs.items():
        _, lab = np.unique(np.asarray(labels)[idx], return_inverse=True)
        m = lab.max() + 1
        if m < 2:
            out[k] = -1.0
            continue
        sizes = np.bincount(lab, minlength=m)
        sums = D @ np.eye(m)[lab]  # (n, m): each point's summed distance to each cluster
        rows = np.arange(len(lab))
        own = sizes[lab]
        with np.errstate(divide="ignore", invalid="ignore"):
            a = sums[rows, lab] / (own - 1)
            sums[rows, lab] = np.inf
            b = (sums / sizes).min(1)
            s = (b - a) / np.maximum(a, b)
        out[k] = float(np.mean(np.where(own > 1, np.nan_to_num(s), 0.0)))
    return out


@CLUSTERERS.register("gmm")
def gmm_clusters(X: np.ndarray, cspec, seed: int) -> tuple[np.ndarray, dict]:
    """Gaussian mixture with diagonal covariances (sklearn, EM, k-means init, `nredo` restarts).

    k = auto fits every k in 2..k_max and keeps the lowest BIC. Components that end up owning
    no point are dropped, so the labels are dense 0..k'-1 (info: "k" chosen, "k_used" non-empty).
    """
    from sklearn.mixture import GaussianMixture

    X = np.asarray(X, np.float64)
    # variance floor relative to the data's own scale: dimensions that are (nearly) constant, such as
    # an unused colour channel, must not let one component win by collapsing onto them
    reg = GMM_REG_COVAR * max(float(X.var(0).mean()), 1e-12)
    fits, bics = {}, {}
    for k in candidate_ks(cspec, len(X)):
        gm = GaussianMixture(
            k, covariance_type="diag", n_init=cspec.nredo, max_iter=GMM_MAX_ITER, reg_covar=reg, random_state=seed
        ).fit(X)
        fits[k], bics[k] = gm, float(gm.bic(X))
    best = min(bics, key=lambda k: (bics[k], k))
    _, labels = np.unique(fits[best].predict(X), return_inverse=True)
    info = {"k": int(best), "k_used": int(labels.max()) + 1}
    if len(bics) > 1:
        info["bic"] = {str(k): round(v, 3) for k, v in bics.items()}
    return labels.astype(np.int64), info


def cluster(X: np.ndarray | ChunkedRows, cspec, seed: int) -> tuple[np.ndarray, dict]:
    """Cluster one scope's points with the registered `cspec.method`; labels 0..k-1 and what was chosen.

    `X` is an (n, d) array, or `ChunkedRows` (chunked, maybe memmapped): those of SCALE_MIN_N points or
    more take the method's `SCALABLE` route where it has one, and the others are copied in once.
    """
    n = len(X)
    if n < 2:
        return np.zeros(n, np.int64), {"k": 1, "n": n}
    if isinstance(X, ChunkedRows):
        if n >= scale.SCALE_MIN_N and cspec.method in SCALABLE:
            labels, info = SCALABLE[cspec.method](X, cspec, seed)
            return np.asarray(labels, np.int64), {"n": n, **info}
        X = X.materialize()
    labels, info = CLUSTERERS.get(cspec.method)(X, cspec, seed)
    return np.asarray(labels, np.int64), {"n": n, **info}
