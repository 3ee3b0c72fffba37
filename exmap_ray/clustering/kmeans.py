"""k-means on all points, k-means++ seeded: FAISS, or the joint-restart Lloyd in numpy for large inputs on
the CPU (docs/cluster_scale.md); on the GPU route (clustering/device.py: the clusters stage with
resources.gpu true) FAISS's GPU build on the task's GPU, or torch where that build is absent.

    from exmap_ray.clustering.kmeans import kmeans
    labels = kmeans(X, k=4, niter=25, nredo=3, seed=0)
"""

from __future__ import annotations

import contextlib
import math
import os

import faiss
import numpy as np

from . import device, scale

JOINT_ITERS = 5  # kmeans_joint: iterations all restarts run before only the best goes on
LLOYD_CHUNK = 8192  # rows per step of kmeans_joint: its (chunk, d) block and products stay in cache
FAISS_ONE_THREAD_MAX = 6_000_000  # N x d at or below which FAISS's CPU k-means runs on one OpenMP thread


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
                Xc = X[lo : lo + step]
                D = (cn[None] - 2 * (Xc @ C.T)).reshape(len(Xc), r, k)  # |x - c|^2 - |x|^2
                a = D.argmin(2)
                obj = (
                    np.maximum(np.take_along_axis(D, a[..., None], 2)[..., 0] + xsq[lo : lo + step, None], 0).sum(0)
                    if scored
                    else 0.0
                )
                if last:  # the last assignment: every restart still running (niter <= JOINT_ITERS) or one
                    labels[lo : lo + len(Xc)] = a
                    return 0.0, 0.0, obj
                onehot = np.zeros((len(Xc), r * k), np.float32)
                onehot[rows[: len(Xc)], a + offset] = 1
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
                C, r, labels = C[best * k : (best + 1) * k], 1, labels[:, :1]


def kmeans(X: np.ndarray, k: int, niter: int = 25, nredo: int = 3, seed: int = 0) -> np.ndarray:
    """Labels (N,) from k-means on all N points, k-means++ seeded; the best of `nredo` restarts.

    FAISS k-means. From SCALE_MIN_N points on the CPU, `kmeans_joint` runs the restarts together instead,
    at about half the CPU time of FAISS's 3 restarts with the same inertia (docs/cluster_scale.md); below
    SCALE_MIN_N nothing changed. On the GPU route (`device.clustering_device`): FAISS's GPU build on that
    one device, or `kmeans_torch` where the build is absent.
    """
    X = np.ascontiguousarray(X, dtype=np.float32)
    if k >= len(X):
        return np.arange(len(X)) % k
    rng = np.random.default_rng(seed)
    if device.torch_route() is not None:
        return kmeans_torch(X, k, niter, nredo, rng, device.torch_route())
    if len(X) >= scale.SCALE_MIN_N and device.current() is None:
        return kmeans_joint(X, [kmeanspp_init(X, k, rng) for _ in range(nredo)], niter)
    best, best_obj = None, np.inf
    with _faiss_threads(1 if X.size <= FAISS_ONE_THREAD_MAX and device.current() is None else None):
        for _ in range(nredo):
            km = _faiss_train(X, k, niter, rng)
            obj = float(km.obj[-1]) if len(km.obj) else np.inf
            if obj < best_obj or best is None:
                best, best_obj = km, obj
        _, labels = best.index.search(X, 1)
    return labels.ravel().astype(np.int64)


def _faiss_train(X: np.ndarray, k: int, niter: int, rng: np.random.Generator):
    """One FAISS k-means, k-means++ seeded from `rng`, trained on X."""
    km = faiss.Kmeans(
        X.shape[1],
        k,
        niter=niter,
        seed=int(rng.integers(2**31 - 1)),
        gpu=False,
        max_points_per_centroid=math.ceil(len(X) / k) + 1,
        min_points_per_centroid=1,
        verbose=False,
    )
    km.index = device.faiss_index(km.index)  # the task's GPU alone (GPU route), else as it was
    km.train(X, init_centroids=kmeanspp_init(X, k, rng))
    return km


@contextlib.contextmanager
def _faiss_threads(n: int | None):
    """FAISS's OpenMP threads for this thread's calls inside the block (None: as they are). On small inputs
    one thread is faster on 2 cores: 3,000 x 1,100, k = 2..10, 3 restarts each, took 1.2 s on one thread
    against 3.3 s on two, with the same labels; at 10,000 x 1,100 the two are close (docs/benchmarks.md)."""
    if n is None:
        yield
        return
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


TORCH_CHUNK = 1 << 18  # rows per distance block in kmeans_torch: (chunk, k) distances on the device


def kmeans_torch(X: np.ndarray, k: int, niter: int, nredo: int, rng: np.random.Generator, device: str) -> np.ndarray:
    """Lloyd's k-means in torch on `device` (the GPU route where FAISS's GPU build is absent), k-means++
    seeded like the FAISS path (`kmeanspp_init`, same draws), the best of `nredo` restarts by inertia.
    The points go to the device once; each iteration is one pass of (chunk, k) distance blocks. An empty
    cluster keeps its centroid, as FAISS's would be re-split instead (rare at these k)."""
    import torch

    T = torch.as_tensor(X, device=device)
    tsq = (T * T).sum(1)
    best, best_obj = None, float("inf")
    for _ in range(nredo):
        C = torch.as_tensor(kmeanspp_init(X, k, rng), device=device)
        for it in range(niter + 1):
            labels, obj = _assign_torch(T, tsq, C)
            if it == niter:
                break
            sums = torch.zeros_like(C).index_add_(0, labels, T)
            counts = torch.bincount(labels, minlength=k).to(T.dtype)
            C = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], C)
        if obj < best_obj or best is None:
            best, best_obj = labels, obj
    return best.cpu().numpy().astype(np.int64)


def _assign_torch(T, tsq, C):
    """Nearest centroid of every row (chunked) and the inertia, as a Python float (one sync)."""
    import torch

    csq = (C * C).sum(1)
    labels = torch.empty(len(T), dtype=torch.int64, device=T.device)
    obj = torch.zeros((), dtype=torch.float64, device=T.device)
    for lo in range(0, len(T), TORCH_CHUNK):
        D = csq[None] - 2 * T[lo : lo + TORCH_CHUNK] @ C.T  # |x - c|^2 - |x|^2
        d, a = D.min(1)
        labels[lo : lo + len(a)] = a
        obj += (d + tsq[lo : lo + TORCH_CHUNK]).clamp(min=0).sum(dtype=torch.float64)
    return labels, float(obj)
