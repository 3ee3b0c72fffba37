"""Clustering heatmaps (or any (N, d) rows) into pseudo groups; clusterers sit in `CLUSTERERS`.

    from exmap_ray.clustering import pseudo_groups
    groups, info = pseudo_groups(heatmaps.reshape(n, -1), y_val, spec.clustering, seed=0)

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
- local scope clusters each class apart; global clusters all points. Either
  way the pseudo group is (class, cluster), numbered 0..G-1.

Heatmaps may be an np.memmap or a list of shards. A scope of `SCALE_MIN_N` points or more
takes the scalable route for `spectral` (and `kmeans`'s k = auto): the anchor-graph spectrum of
`clustering_scale`, streamed in chunks, never a whole copy. Below it the exact path runs
unchanged (docs/cluster_scale.md has the measured agreement and times).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os

import faiss
import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import eigsh

from .clustering_scale import SCALE_MIN_N, Rows, _faiss_gpu, anchor_spectrum
from .clustering_scale import normalize_rows  # noqa: F401 (re-exported: callers import it from here)
from .errors import DataError, UserError
from .registry import Registry

log = logging.getLogger(__name__)
N_EIGS = 13  # the paper inspects the 13 smallest eigenvalues
DENSE_EIG_MAX = 2500  # below this a dense eigendecomposition is faster and exact
SILHOUETTE_SAMPLE = 4000  # kmeans_silhouette scores at most this many points (silhouette is O(n^2))
JOINT_ITERS = 5  # kmeans_joint: iterations all restarts run before only the best goes on
LLOYD_CHUNK = 8192  # rows per step of kmeans_joint: its (chunk, d) block and products stay in cache
GMM_MAX_ITER = 200
GMM_REG_COVAR = 1e-3  # gmm variance floor, as a fraction of the mean per-dimension variance


def kmeanspp_init(X: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding (D^2 sampling): spreads the initial centroids over distinct clusters.

    Squared distances come from |x|^2 - 2 x.c + |c|^2, one matrix-vector product per seed, so
    no (N, d) temporary is made (1M x 147: 0.1 s a seed instead of about 1 s); the same draws.
    """
    sq = np.einsum("ij,ij->i", X, X)
    centers = np.empty((k, X.shape[1]), np.float32)
    j = rng.integers(len(X))
    centers[0] = X[j]
    d2 = np.maximum(sq - 2 * (X @ centers[0]) + sq[j], 0)
    for i in range(1, k):
        total = float(d2.sum(dtype=np.float64))
        j = rng.choice(len(X), p=d2 / total) if total > 0 else rng.integers(len(X))
        centers[i] = X[j]
        d2 = np.minimum(d2, np.maximum(sq - 2 * (X @ centers[i]) + sq[j], 0))
    return centers


def kmeans_joint(X: np.ndarray, inits: list[np.ndarray], niter: int) -> np.ndarray:
    """Lloyd for several restarts at once: one pass over X per iteration scores every restart's
    centroids with one (chunk, restarts * k) product.

    After JOINT_ITERS iterations only the restart with the lowest inertia goes on (k-means'
    inertia ranks restarts early; tests/test_cluster_scale.py checks the result against FAISS's
    best of 3), so 3 restarts of 25 iterations cost about 35 single ones, not 75. `niter`
    updates, then a last assignment gives the labels. An empty cluster keeps its centroid.
    Chunks go to one Python thread per core with single-threaded BLAS: on shared cores BLAS's own
    threads spin on these small products (measured: 19x the CPU time at 200k rows, load 15 on 2 cores).
    """
    from concurrent.futures import ThreadPoolExecutor

    from threadpoolctl import threadpool_limits

    r, (k, d) = len(inits), inits[0].shape
    C = np.concatenate(inits).astype(np.float32)
    labels = np.empty((len(X), r), np.int16)
    xsq = np.einsum("ij,ij->i", X, X)
    step, rows = LLOYD_CHUNK, np.arange(LLOYD_CHUNK)[:, None]
    with threadpool_limits(1, user_api="blas"), ThreadPoolExecutor(len(os.sched_getaffinity(0))) as pool:
        for it in range(niter + 1):
            offset = np.arange(r) * k
            scored = it == niter or (r > 1 and it == min(JOINT_ITERS, niter))
            cn = np.einsum("ij,ij->i", C, C)

            def one(lo, C=C, cn=cn, r=r, offset=offset, scored=scored, last=it == niter, labels=labels):
                Xc = X[lo:lo + step]
                D = (cn[None] - 2 * (Xc @ C.T)).reshape(len(Xc), r, k)  # |x - c|^2 - |x|^2
                a = D.argmin(2)
                obj = np.maximum(np.take_along_axis(D, a[..., None], 2)[..., 0] + xsq[lo:lo + step, None],
                                 0).sum(0) if scored else 0.0
                if last:  # the last assignment: every restart still running (niter <= JOINT_ITERS) or one
                    labels[lo:lo + len(Xc)] = a
                    return 0.0, 0.0, obj
                onehot = np.zeros((len(Xc), r * k), np.float32)
                onehot[rows[:len(Xc)], a + offset] = 1
                return onehot.T @ Xc, onehot.sum(0), obj

            sums, counts, obj = np.zeros((r * k, d)), np.zeros(r * k), np.zeros(r)
            for s_, c_, o_ in pool.map(one, range(0, len(X), step)):  # in chunk order: the same sums every run
                sums += s_
                counts += c_
                obj += o_
            if it == niter:
                return labels[:, int(np.argmin(obj))].astype(np.int64)
            C = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], C).astype(np.float32)
            if scored:  # from here on, the best restart only
                best = int(np.argmin(obj))
                C, r, labels = C[best * k:(best + 1) * k], 1, labels[:, :1]


def kmeans(X: np.ndarray, k: int, niter: int = 25, nredo: int = 3, seed: int = 0) -> np.ndarray:
    """Labels (N,) from k-means on all N points, k-means++ seeded; the best of `nredo` restarts.

    FAISS k-means (on the GPU when a FAISS GPU build sees one). From SCALE_MIN_N points on the CPU,
    `kmeans_joint` runs the restarts together instead, at about half the CPU time of FAISS's 3 restarts
    with the same inertia (docs/cluster_scale.md); below SCALE_MIN_N nothing changed.
    """
    X = np.ascontiguousarray(X, dtype=np.float32)
    if k >= len(X):
        return np.arange(len(X)) % k
    rng = np.random.default_rng(seed)
    if len(X) >= SCALE_MIN_N and not _faiss_gpu():
        return kmeans_joint(X, [kmeanspp_init(X, k, rng) for _ in range(nredo)], niter)
    best, best_obj = None, np.inf
    for _ in range(nredo):
        km = faiss.Kmeans(X.shape[1], k, niter=niter, seed=int(rng.integers(2**31 - 1)), gpu=_faiss_gpu(),
                          max_points_per_centroid=math.ceil(len(X) / k) + 1, min_points_per_centroid=1,
                          verbose=False)
        km.train(X, init_centroids=kmeanspp_init(X, k, rng))
        obj = float(km.obj[-1]) if len(km.obj) else np.inf
        if obj < best_obj or best is None:
            best, best_obj = km, obj
    _, labels = best.index.search(X, 1)
    return labels.ravel().astype(np.int64)


def knn_affinity(X: np.ndarray, k_nn: int | None = None) -> sp.csr_matrix:
    """Symmetric 0/1 kNN connectivity, A = (C + C^T) / 2, with k_nn = int(ln N) by default."""
    X = np.ascontiguousarray(X, dtype=np.float32)
    n = len(X)
    k_nn = min(max(k_nn or int(math.log(n)), 1), n - 1)
    index = faiss.IndexFlatL2(X.shape[1])
    index.add(X)
    _, nbr = index.search(X, k_nn + 1)
    rows = np.repeat(np.arange(n), k_nn + 1)
    C = sp.csr_matrix((np.ones(rows.size, np.float64), (rows, nbr.ravel())), shape=(n, n))
    C.setdiag(0)
    C.eliminate_zeros()
    C.data[:] = 1.0
    return ((C + C.T) * 0.5).tocsr()


def laplacian_spectrum(A: sp.csr_matrix, n_eig: int = N_EIGS) -> tuple[np.ndarray, np.ndarray]:
    """Smallest `n_eig` eigenvalues (ascending) of L = I - D^-1/2 A D^-1/2 and their eigenvectors."""
    d = np.asarray(A.sum(axis=1)).ravel()
    dinv = 1.0 / np.sqrt(np.where(d > 0, d, 1.0))
    M = sp.diags(dinv) @ A @ sp.diags(dinv)
    n_eig = min(n_eig, A.shape[0] - 1)
    if A.shape[0] <= DENSE_EIG_MAX:
        w, V = np.linalg.eigh(M.toarray())
        w, V = w[::-1][:n_eig], V[:, ::-1][:, :n_eig]
    else:
        w, V = eigsh(M, k=n_eig, which="LA", tol=1e-6, v0=np.full(A.shape[0], 1.0 / math.sqrt(A.shape[0])))
        order = np.argsort(-w)
        w, V = w[order], V[:, order]
    return np.clip(1.0 - w, 0.0, 2.0), V


def eigengap_k(eigvals: np.ndarray, k_max: int = 10) -> int:
    """k in 2..k_max maximising lambda_{k+1} - lambda_k (eigenvalues ascending, 1-indexed)."""
    ks = [k for k in range(2, k_max + 1) if k < len(eigvals)]
    if not ks:
        return 2
    return max(ks, key=lambda k: eigvals[k] - eigvals[k - 1])


CLUSTERERS: Registry = Registry("clusterer", "clustering.method")
"""name -> fn(X (n, d) float32, cspec, seed) -> (labels (n,) int64 in 0..k-1, info with at least "k").

`cspec` is a `spec.ClusteringSpec`; `cspec.k` is an int or "auto" (each clusterer says how it picks
k), `cspec.k_max` bounds the search. X may be heatmaps or features: clusterers only see rows."""


def _check_k(k: int, n: int) -> None:
    if k > n:
        raise UserError(f"clustering.k = {k} is larger than a scope's {n} val points; lower clustering.k "
                        f"or use clustering.k: auto")


def _eigengap(X: np.ndarray, cspec, info: dict):
    eigvals, V = laplacian_spectrum(knn_affinity(X))
    info["eigenvalues"] = [round(float(v), 6) for v in eigvals]
    return (eigengap_k(eigvals, cspec.k_max) if cspec.k == "auto" else cspec.k), V


@CLUSTERERS.register("spectral")
def spectral_clusters(X: np.ndarray, cspec, seed: int) -> tuple[np.ndarray, dict]:
    """The paper: kNN graph, normalised Laplacian, k by eigengap (k=auto), k-means on the row-normalised eigenvectors."""
    info: dict = {}
    k, V = _eigengap(X, cspec, info)
    _check_k(k, len(X))
    info["k"] = int(k)
    if k > V.shape[1]:
        _, V = laplacian_spectrum(knn_affinity(X), n_eig=k + 1)
    emb = V[:, :k]
    emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    return kmeans(emb.astype(np.float32), k, cspec.niter, cspec.nredo, seed), info


@CLUSTERERS.register("spectral_split")
def spectral_split_clusters(X: np.ndarray, cspec, seed: int) -> tuple[np.ndarray, dict]:
    """`spectral`, then each of its clusters is clustered again by its own eigengap k, while the gap is clear.

    The first level is `spectral` as configured (`clustering.k`). Below it, a part is split when fewer
    than `split_depth` levels are used, it holds at least 2 x `split_min_size` points, its relative
    eigengap (lambda_k+1 - lambda_k) / lambda_k+1 is at least `split_gap`, and no child would hold
    fewer than half of `split_min_size`; otherwise it is a final cluster. A second shortcut whose
    minority the first eigengap merged into a larger cluster can then still get clusters of its own.
    """
    if len(X) >= SCALE_MIN_N:
        raise UserError(f"clustering.method spectral_split builds the exact kNN graph at every level and takes "
                        f"scopes of under {SCALE_MIN_N:,} points; this one has {len(X):,}. Use "
                        f"clustering.method: spectral (its anchor-graph route scales), or clustering.scope: local")
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
        if depth > 0 and (gap is None or gap < cspec.split_gap or np.bincount(labels, minlength=k).min() < cspec.split_min_size // 2):
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
    _check_k(k, len(X))
    info["k"] = int(k)
    return kmeans(X, k, cspec.niter, cspec.nredo, seed), info


def _anchor_k(rows: Rows, cspec, seed: int, info: dict):
    """The scalable `_eigengap`: the anchor graph's spectrum (see clustering_scale)."""
    n_eig = N_EIGS if cspec.k == "auto" else max(N_EIGS, int(cspec.k) + 1)
    spec = anchor_spectrum(rows, seed, n_eig=n_eig)
    info.update(route="anchor", anchors=spec.anchors, eigenvalues=[round(float(v), 6) for v in spec.eigenvalues])
    k = eigengap_k(spec.eigenvalues, cspec.k_max) if cspec.k == "auto" else cspec.k
    _check_k(k, len(rows))
    info["k"] = int(k)
    return k, spec


def _spectral_anchor(rows: Rows, cspec, seed: int) -> tuple[np.ndarray, dict]:
    """`spectral` above SCALE_MIN_N: the anchor graph's eigenvectors, row-normalised, then k-means."""
    info: dict = {}
    k, spec = _anchor_k(rows, cspec, seed, info)
    emb = spec.embed(k)
    emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    return kmeans(emb, k, cspec.niter, cspec.nredo, seed), info


def _kmeans_large(rows: Rows, cspec, seed: int) -> tuple[np.ndarray, dict]:
    """`kmeans` above SCALE_MIN_N: k = auto from the anchor spectrum; FAISS k-means on one copy of the rows."""
    info: dict = {}
    k = _anchor_k(rows, cspec, seed, info)[0] if cspec.k == "auto" else cspec.k
    _check_k(k, len(rows))
    info["k"] = int(k)
    return kmeans(rows.materialize(), k, cspec.niter, cspec.nredo, seed), info


SCALABLE = {"spectral": _spectral_anchor, "kmeans": _kmeans_large}
"""Clusterers with a route for scopes of SCALE_MIN_N points or more; the others cluster one in-memory copy."""


def candidate_ks(cspec, n: int) -> list[int]:
    """k = auto searches 2..min(k_max, n - 1); an integer k is the only candidate."""
    if cspec.k != "auto":
        _check_k(cspec.k, n)
        return [int(cspec.k)]
    return list(range(2, max(2, min(cspec.k_max, n - 1)) + 1))


@CLUSTERERS.register("kmeans_silhouette")
def kmeans_silhouette_clusters(X: np.ndarray, cspec, seed: int) -> tuple[np.ndarray, dict]:
    """GEORGE / SpuCo style: FAISS k-means for each k in 2..k_max, keep the k with the best silhouette.

    The silhouette (Euclidean) is computed on at most SILHOUETTE_SAMPLE points, so it stays cheap
    on large scopes. With an integer k this is plain k-means.
    """
    from sklearn.metrics import silhouette_score

    ks = candidate_ks(cspec, len(X))
    runs = {k: kmeans(X, k, cspec.niter, cspec.nredo, seed) for k in ks}
    if len(ks) == 1:
        return runs[ks[0]], {"k": ks[0]}
    scores = {}
    for k, labels in runs.items():
        scores[k] = float(silhouette_score(X, labels, sample_size=min(len(X), SILHOUETTE_SAMPLE),
                                           random_state=seed)) if len(np.unique(labels)) > 1 else -1.0
    best = max(ks, key=lambda k: (scores[k], -k))  # ties: the smaller k
    return runs[best], {"k": int(best), "silhouette": {str(k): round(v, 6) for k, v in scores.items()}}


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
        gm = GaussianMixture(k, covariance_type="diag", n_init=cspec.nredo, max_iter=GMM_MAX_ITER,
                             reg_covar=reg, random_state=seed).fit(X)
        fits[k], bics[k] = gm, float(gm.bic(X))
    best = min(bics, key=lambda k: (bics[k], k))
    _, labels = np.unique(fits[best].predict(X), return_inverse=True)
    info = {"k": int(best), "k_used": int(labels.max()) + 1}
    if len(bics) > 1:
        info["bic"] = {str(k): round(v, 3) for k, v in bics.items()}
    return labels.astype(np.int64), info


def cluster(X: np.ndarray | Rows, cspec, seed: int) -> tuple[np.ndarray, dict]:
    """Cluster one scope's points with the registered `cspec.method`; labels 0..k-1 and what was chosen.

    `X` is an (n, d) array, or `Rows` (chunked, maybe memmapped): those of SCALE_MIN_N points or
    more take the method's `SCALABLE` route where it has one, and the others are copied in once.
    """
    n = len(X)
    if n < 2:
        return np.zeros(n, np.int64), {"k": 1, "n": n}
    if isinstance(X, Rows):
        if n >= SCALE_MIN_N and cspec.method in SCALABLE:
            labels, info = SCALABLE[cspec.method](X, cspec, seed)
            return np.asarray(labels, np.int64), {"n": n, **info}
        X = X.materialize()
    labels, info = CLUSTERERS.get(cspec.method)(X, cspec, seed)
    return np.asarray(labels, np.int64), {"n": n, **info}


def _each_chunk(H):
    """(N, d) float32 chunks of an array, memmap or list of shards, as stored (not normalised)."""
    return (X for _, X in Rows(H, normalize=False).chunks())


def _n_rows(H) -> int:
    return len(H) if isinstance(H, np.ndarray) else sum(len(s) for s in H)


def check_heatmaps(H: np.ndarray) -> None:
    """Refuse heatmaps that cannot be clustered: any NaN/inf, or every one all zero (a dead model)."""
    n = _n_rows(H)
    if n == 0:
        raise DataError("no heatmaps to cluster: the val split is empty")
    bad = sum(int((~np.isfinite(X)).any(axis=1).sum()) for X in _each_chunk(H))
    if bad:
        raise DataError(f"{bad} of {n} heatmaps contain NaN or inf values; nothing sensible can be "
                        f"clustered. Likely causes: ERM diverged (lower erm.lr, check the ERM loss/accuracy) "
                        f"or the heatmap method is unstable for this backbone (raise heatmaps.epsilon or "
                        f"try heatmaps.method input_x_gradient)")
    if not any(X.any() for X in _each_chunk(H)):
        raise DataError(f"all {n} heatmaps are all zero: the model explains nothing. Likely causes: "
                        f"ERM collapsed to a constant prediction (a dead model: check the ERM stage's "
                        f"accuracy, lower erm.lr) or the wrong heatmap method for this backbone "
                        f"(try heatmaps.method input_x_gradient or gradcam)")


def check_rows(X: np.ndarray, what: str) -> None:
    """Refuse rows (e.g. penultimate features) that are empty or hold NaN/inf, naming `what`."""
    n = _n_rows(X)
    if n == 0:
        raise DataError(f"no {what} to cluster: the val split is empty")
    bad = sum(int((~np.isfinite(C)).any(axis=1).sum()) for C in _each_chunk(X))
    if bad:
        raise DataError(f"{bad} of {n} rows of {what} contain NaN or inf values; nothing sensible can be "
                        f"clustered (did ERM diverge? check the ERM loss/accuracy)")


def channel_sums(H) -> np.ndarray:
    """`clustering.cross_spatial`'s rows: each (C, h, w) heatmap summed over its channels, (N, h * w) float32.

    Where the relevance lies, whichever channel carries it (the usual way an LRP map is shown). `H` is an
    (N, C, h, w) array, memmap or list of such shards, read in chunks: the result is one N x h*w copy
    (a million 14x14 maps: 0.8 GB)."""
    shards = [H] if isinstance(H, np.ndarray) else list(H)
    if not shards or any(np.ndim(s) != 4 for s in shards):
        shapes = sorted({tuple(np.shape(s)[1:]) for s in shards})
        raise UserError(f"clustering.cross_spatial sums each heatmap over its channels, so it needs heatmaps of "
                        f"shape (N, channels, height, width); these are {shapes or 'empty'} per point. Set "
                        f"clustering.cross_spatial: none (every shipped heatmaps.method gives that shape; with "
                        f"gradcam's single channel the crossing changes nothing)")
    rows = Rows(shards, normalize=False)
    c = shards[0].shape[1]
    out = np.empty((len(rows), rows.d // c), np.float32)
    for lo, X in rows.chunks():
        out[lo:lo + len(X)] = X.reshape(len(X), c, -1).sum(1)
    return out


def _scope_rows(H, normalize: bool):
    """What the clusterer reads: one in-memory copy below SCALE_MIN_N rows (the exact path), else `Rows`."""
    rows = Rows(H, normalize)
    return rows.materialize() if len(rows) < SCALE_MIN_N else rows


def _cluster_scopes(X, y: np.ndarray, cspec, seed: int) -> tuple[np.ndarray, dict]:
    """Cluster ids per point (each scope numbered from 0) and each scope's info: per class (local) or global."""
    if cspec.scope != "local":
        labels, info = cluster(X, cspec, seed)
        return labels, {"global": info}
    cluster_of, scopes = np.zeros(len(X), np.int64), {}
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        labels, info = cluster(X[idx] if isinstance(X, np.ndarray) else X.subset(idx), cspec, seed + int(c))
        cluster_of[idx] = labels
        scopes[f"class {int(c)}"] = info
    return cluster_of, scopes


def pseudo_groups(H: np.ndarray, y: np.ndarray, cspec, seed: int, what: str = "heatmaps",
                  cross=None, correct: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
    """Pseudo group per point = (class, cluster), numbered densely 0..G-1.

    `H` is any (N, ...) array, flattened per row: heatmaps by default, or penultimate features
    (pass `what="features"`: the input checks then speak of features, not heatmaps). It may be an
    np.memmap or a list of shards: from SCALE_MIN_N rows on it is read in chunks, never copied whole
    (except by clusterers without a scalable route).
    `cross`: other (N, d) rows of the same points (`clustering.cross_spatial`: the heatmaps' channel
    sums), clustered the same way; a point's cluster is then the pair (its cluster, its cluster in
    `cross`), so a second structure the first clustering left inside its clusters splits them.
    `correct` (N,) bool, with `cross` (`cross_spatial: hard`): whether ERM got each point right; within
    each (class, cluster) the parts `cross` cuts it into stay apart only where ERM's accuracy on them is
    below its accuracy on the whole (class, cluster); the others stay together.
    Returns the labels and a dict with each scope's chosen k and the (class, cluster) of each group.
    """
    check_heatmaps(H) if what == "heatmaps" else check_rows(H, what)
    y = np.asarray(y)
    X = _scope_rows(H, cspec.normalize)  # below SCALE_MIN_N: the exact path, as ever
    cluster_of, scopes = _cluster_scopes(X, y, cspec, seed)
    crossed = None
    if cross is not None:
        other, crossed = _cluster_scopes(_scope_rows(cross, cspec.normalize), y, cspec, seed)
        if correct is not None:
            other, crossed["kept_apart"] = keep_hard_parts(y, cluster_of, other, np.asarray(correct, bool))
        _, cluster_of = np.unique(cluster_of * (int(other.max()) + 1) + other, return_inverse=True)
        cluster_of = cluster_of.ravel().astype(np.int64)
    cluster_of, merges = merge_small(X, y, cluster_of, cspec.min_group_size)
    classes, ycode = np.unique(y, return_inverse=True)  # (class, cluster) pairs in sorted order, numbered densely
    base = int(cluster_of.max()) + 1
    keys, groups = np.unique(ycode.ravel() * base + cluster_of, return_inverse=True)
    groups = groups.ravel().astype(np.int64)
    pairs = list(zip(classes[keys // base].tolist(), (keys % base).tolist()))
    sizes = np.bincount(groups, minlength=len(pairs))
    log.info("clustering: %s/%s -> %d pseudo groups, sizes %s%s", cspec.method, cspec.scope, len(pairs),
             sizes.tolist(), f" ({len(merges)} small fragment(s) merged)" if merges else "")
    info = {"scopes": scopes, "n_groups": len(pairs), "group_class_cluster": pairs,
            "sizes": sizes.tolist(), "merged": merges}
    if crossed is not None:
        info["cross_scopes"] = crossed
    return groups, info


def keep_hard_parts(y: np.ndarray, cluster_of: np.ndarray, part: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, int]:
    """`cross_spatial: hard`: within each (class, cluster), the parts (ids in `part`) on which ERM's
    accuracy is at least its accuracy on the whole (class, cluster) become one part, id 0; the harder
    parts keep their own ids (shifted by 1). Returns the new part ids and how many parts were kept apart."""
    out = part.astype(np.int64) + 1
    kept = 0
    parent = np.unique(np.stack([y, cluster_of], 1), axis=0, return_inverse=True)[1].ravel()
    for p in np.unique(parent):
        m = parent == p
        acc = correct[m].mean()
        for q in np.unique(part[m]):
            mm = m & (part == q)
            if correct[mm].mean() >= acc:
                out[mm] = 0
            else:
                kept += 1
    return out, kept


def merge_small(X: np.ndarray | Rows, y: np.ndarray, cluster_of: np.ndarray, min_size: int) -> tuple[np.ndarray, list]:
    """Merge (class, cluster) groups under `min_size` into the nearest same-class group by centroid.

    DFR subsamples every group to the smallest one, so a 2-member fragment would
    leave it 2 examples per group. A class with a single group is left alone.
    Centroids are kept until their group changes (`Rows`: one chunked read per group).
    """
    cluster_of = cluster_of.copy()
    merges = []
    for c in np.unique(y):
        cache: dict = {}
        while True:
            idx = np.flatnonzero(y == c)
            ks, counts = np.unique(cluster_of[idx], return_counts=True)
            if len(ks) < 2 or counts.min() >= min_size:
                break
            small = ks[np.argmin(counts)]

            def centroid(k):
                if k not in cache:
                    members = idx[cluster_of[idx] == k]
                    cache[k] = X.mean(members) if isinstance(X, Rows) else X[members].mean(0)
                return cache[k]
            others = [k for k in ks if k != small]
            target = min(others, key=lambda k: float(((centroid(k) - centroid(small)) ** 2).sum()))
            cluster_of[idx[cluster_of[idx] == small]] = target
            cache.pop(target, None)
            cache.pop(small, None)
            merges.append({"class": int(c), "cluster": int(small), "size": int(counts.min()), "into": int(target)})
    return cluster_of, merges
