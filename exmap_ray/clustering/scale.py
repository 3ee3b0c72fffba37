"""Clustering millions of heatmaps: an anchor-graph spectrum over chunked rows (exmap_ray/chunked.py).

    from exmap_ray.chunked import ChunkedRows
    from exmap_ray.clustering.scale import anchor_spectrum, planted_heatmaps
    H, truth = planted_heatmaps(1_000_000, minority=0.001, seed=0)   # or np.load(path, mmap_mode="r")
    spec = anchor_spectrum(ChunkedRows(H, normalize=True), seed=0)   # 13 eigenvalues + an embedder
    emb = spec.embed(k)                                              # (N, k) rows for k-means

`clustering.pseudo_groups` uses this above `SCALE_MIN_N` points per scope; below it the
exact path (an exact kNN graph, quadratic) runs unchanged. benchmarks/cluster_scale.py
measures both, and docs/cluster_scale.md says why this route (anchors) over an approximate
kNN graph.

The anchor graph (Nystrom-style, as in landmark / anchor-graph spectral clustering):
1. `N_ANCHORS` anchors from a uniform sample of the rows: rows picked by D^2 sampling, which puts
   anchors in far, small groups (a 0.1% minority) that a uniform pick would miss, each averaged
   with its nearest sampled rows (`ANCHOR_MEAN` rows in all). Averaging a few rows cuts an anchor's
   noise enough that a small far group's rows prefer its anchors sharply; k-means centroids of ~50
   rows cut it so far that the anchors lie along the data's top principal directions, and a graph
   on them is a chain along those: a cluster stretched by the max-|value| normalisation then splits
   in two (docs/cluster_scale.md, "k and N").
2. Each row links to its `ANCHOR_NN` nearest anchors with weights exp(-(d_j^2 - d_1^2) / h^2),
   normalised to sum 1 (Z, N x m, r nonzeros a row). h^2 is the mean spread d_r^2 - d_1^2, so
   anchors across a gap between groups get ~0 weight: the graph keeps the kNN graph's locality.
3. W = Z diag(Z^T 1)^-1 Z^T has unit degrees, so its normalised Laplacian is I - W, and its
   eigenpairs come from the m x m matrix diag^-1/2 Z^T Z diag^-1/2: O(N r^2 + m^3), not O(N^2).
   The rows averaged into anchors sit closer to them than fresh rows; they are left out of Z^T Z
   (and embedded like the others), so Z^T Z / N, and with it the spectrum and the eigengap k, does
   not depend on N: only its sampling noise does.
Only Z (N x r indices and weights) and the (N, k) embedding are held: the rows are streamed
in chunks and never copied whole.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import faiss
import numpy as np
import scipy.linalg
from threadpoolctl import threadpool_limits

from ..chunked import CHUNK_ROWS, ChunkedRows
from . import device

# at or above this many points a scope takes the anchor path (the exact kNN graph costs ~7 s at 50k, 25 s at 100k)
SCALE_MIN_N = 50_000
# anchors: the eigenproblem is m x m; 1000 keeps a 0.1% minority's few anchors and costs ~O(N m d) to link
N_ANCHORS = 1000
ANCHOR_NN = 5  # anchors each row links to (r); more blurs small groups into their neighbours
ANCHOR_SAMPLE = 50  # rows sampled per anchor to pick the anchors from (50k for 1000 anchors)
ANCHOR_MIN_ROWS = 5  # an anchor fewer sampled rows are nearest to is dropped (D^2 seeding also picks outliers)
ANCHOR_MEAN = 3  # rows averaged into an anchor: 1 loses 0.1% minorities, ~50 splits stretched clusters
ANCHOR_MIN_SHARE = 20  # small inputs (the forced route, tests) get at most one anchor per 20 rows
SEED_ROUNDS = 10  # D^2 seeding picks the anchors in this many batches (k-means||-style), not one pass per anchor


def float16_roundtrip(H: np.ndarray) -> np.ndarray:
    """The heatmaps as a float16 store would give them back (cast down and up, float32 out).

    Measures what float16 storage does to the pseudo groups: cluster this and the original and
    compare (benchmarks/cluster_scale.py --float16). Reads `H` in chunks, so a memmap works.
    """
    out = np.empty((len(H), int(np.prod(H.shape[1:]))), np.float32)
    for lo in range(0, len(H), CHUNK_ROWS):
        out[lo : lo + CHUNK_ROWS] = (
            np.asarray(H[lo : lo + CHUNK_ROWS], np.float32)
            .reshape(-1, out.shape[1])
            .astype(np.float16)
            .astype(np.float32)
        )
    return out


def d2_seed(X: np.ndarray, m: int, rng: np.random.Generator, rounds: int = SEED_ROUNDS) -> np.ndarray:
    """Positions of m seed rows of X by D^2 sampling in `rounds` batches: each batch draws ~m/rounds rows with
    probability proportional to their squared distance to the seeds so far (the k-means|| idea). A far, small
    group has a large share of the D^2 mass until a seed lands in it."""
    n = len(X)
    m = min(m, n)
    sq = np.einsum("ij,ij->i", X, X)
    chosen = [int(rng.integers(n))]
    d2 = np.maximum(sq + sq[chosen[0]] - 2 * X @ X[chosen[0]], 0)
    per_round = math.ceil((m - 1) / rounds) if m > 1 else 0
    while len(chosen) < m:
        total = float(d2.sum())
        want = min(per_round, m - len(chosen))
        if total <= 0:  # every row sits on a seed: take unseen rows uniformly
            rest = np.setdiff1d(np.arange(n), chosen)
            chosen += rng.choice(rest, min(want, len(rest)), replace=False).tolist()
            if not len(rest):
                break
            continue
        new = np.unique(rng.choice(n, want, p=d2 / total))
        new = new[d2[new] > 0]
        chosen += new.tolist()
        C = X[new]
        dn = sq[:, None] + np.einsum("ij,ij->i", C, C)[None] - 2 * (X @ C.T)
        d2 = np.minimum(d2, np.maximum(dn.min(1), 0))
    return np.array(chosen[:m], np.int64)


def _faiss_gpu() -> bool:
    """FAISS's GPU build on the clusters stage's GPU (clustering/device.py decides, from the stage key)."""
    return device.faiss_gpu()


def _torch_cuda():
    """torch on the GPU route where FAISS's GPU build is absent (clustering/device.py); else None."""
    if device.torch_route() is None:
        return None
    import torch

    return torch


class NearestAnchors:
    """The r nearest anchors of a chunk of rows: FAISS GPU, else torch on CUDA, else FAISS on the CPU."""

    def __init__(self, anchors: np.ndarray, r: int):
        self.r = min(r, len(anchors))
        self.torch = None
        index = faiss.IndexFlatL2(anchors.shape[1])
        index.add(np.ascontiguousarray(anchors, np.float32))
        self.gpu = True
        if _faiss_gpu():
            index = device.faiss_index(index)  # the task's GPU alone
        elif (torch := _torch_cuda()) is not None:
            self.torch, self.A = torch, torch.as_tensor(anchors, device=device.torch_route())
            self.asq = (self.A * self.A).sum(1)
        else:
            self.gpu = False
        self.index = index

    def __call__(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Squared distances (n, r) ascending and anchor ids (n, r) int64."""
        if self.torch is None:
            return self.index.search(np.ascontiguousarray(X, np.float32), self.r)
        T = self.torch.as_tensor(X, device=self.A.device)
        d2 = ((T * T).sum(1, keepdim=True) + self.asq[None] - 2 * T @ self.A.T).clamp_min_(0)
        D, I = self.torch.topk(d2, self.r, dim=1, largest=False, sorted=True)
        return D.cpu().numpy(), I.cpu().numpy()


def pick_anchors(rows: ChunkedRows, m: int, seed: int, q: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Up to m anchors, (m', d) float32, and the positions in `rows` of the rows averaged into each,
    (m', q): from a uniform sample of ANCHOR_SAMPLE * m rows, m rows picked by D^2 sampling, each
    averaged with its q - 1 nearest sampled rows. An anchor that fewer than ANCHOR_MIN_ROWS sampled
    rows are nearest to is dropped (D^2 sampling also picks outliers)."""
    q = q or ANCHOR_MEAN
    rng = np.random.default_rng(seed)
    n = len(rows)
    at = np.sort(rng.choice(n, min(n, ANCHOR_SAMPLE * m), replace=False))
    sample = rows.take(at)
    pick = d2_seed(sample, m, rng)
    index = faiss.IndexFlatL2(sample.shape[1])
    index.add(sample)
    _, near = index.search(sample[pick], min(q, len(sample)))
    near[:, 0] = pick  # the picked row itself, also where duplicates tie with it
    anchors = sample[near].mean(1)
    index = faiss.IndexFlatL2(sample.shape[1])
    index.add(anchors)
    _, owner = index.search(sample, 1)
    owned = np.bincount(owner.ravel(), minlength=len(anchors))
    keep = owned >= min(ANCHOR_MIN_ROWS, owned.max())
    return np.ascontiguousarray(anchors[keep], np.float32), at[near[keep]]


def link_rows(rows: ChunkedRows, search: NearestAnchors, d2: np.ndarray, nbr: np.ndarray) -> None:
    """Fill d2 and nbr (N, r) with each row's nearest anchors, chunk by chunk. On the CPU the chunks
    (read, normalised, searched) go to one Python thread per core, each running FAISS and BLAS on one
    thread: their own threads spin on shared cores (see `clustering.kmeans_joint`)."""

    def one(span: tuple[int, int]) -> None:
        lo, hi = span
        if not search.gpu:
            faiss.omp_set_num_threads(1)  # OpenMP settings are per thread: this worker's only
        d2[lo:hi], nbr[lo:hi] = search(rows.read(lo, hi))

    if search.gpu:
        for span in rows.spans():
            one(span)
        return
    from concurrent.futures import ThreadPoolExecutor

    with threadpool_limits(1, user_api="blas"), ThreadPoolExecutor(len(os.sched_getaffinity(0))) as pool:
        list(pool.map(one, rows.spans()))


@dataclass
class AnchorSpectrum:
    """The anchor graph's Laplacian spectrum and what maps it back to the N rows."""

    eigenvalues: np.ndarray  # (n_eig,) smallest eigenvalues of I - W, ascending
    nbr: np.ndarray  # (N, r) int32 anchor ids of each row
    weight: np.ndarray  # (N, r) float32 link weights, rows sum to 1
    lift: np.ndarray  # (m, n_eig) anchor-side factor: row i's eigenvector entries = weight_i . lift[nbr_i]
    anchors: int

    def embed(self, k: int) -> np.ndarray:
        """(N, k) float32: the first k eigenvectors, one row per point (before row normalisation)."""
        out = np.empty((len(self.nbr), k), np.float32)
        P = self.lift[:, :k].astype(np.float32)
        for lo in range(0, len(out), CHUNK_ROWS):
            w, j = self.weight[lo : lo + CHUNK_ROWS], self.nbr[lo : lo + CHUNK_ROWS]
            out[lo : lo + len(w)] = np.einsum("nr,nrk->nk", w, P[j])
        return out


def anchor_spectrum(
    rows: ChunkedRows, seed: int, n_eig: int = 13, m: int | None = None, r: int | None = None
) -> AnchorSpectrum:
    """The anchor graph of `rows` (see the module docstring) and its `n_eig` smallest Laplacian eigenvalues;
    m and r default to N_ANCHORS and ANCHOR_NN as they are at the call."""
    m, r = m or N_ANCHORS, r or ANCHOR_NN
    anchors, members = pick_anchors(rows, min(m, max(16, len(rows) // ANCHOR_MIN_SHARE)), seed)
    m = len(anchors)
    search = NearestAnchors(anchors, r)
    r = search.r
    n = len(rows)
    nbr = np.empty((n, r), np.int32)
    d2 = np.empty((n, r), np.float32)
    link_rows(rows, search, d2, nbr)
    voter = np.ones(n, bool)  # rows averaged into an anchor sit closer to it than fresh rows: no vote
    voter[members.ravel()] = False
    if not voter.any():
        voter[:] = True
    d2 -= d2[:, :1]  # distances relative to the nearest anchor: the nearest always has weight 1
    h2 = float(d2[voter, -1].mean()) if r > 1 else 1.0
    weight = np.exp(-d2 / max(h2, 1e-12), dtype=np.float32) if r > 1 else np.ones_like(d2)
    del d2
    weight /= weight.sum(1, keepdims=True)
    degree = np.zeros(m)  # Z^T 1 and Z^T Z over the voting rows, Z^T Z as pair counts of each row's r anchors
    ztz = np.zeros(m * m)
    for lo in range(0, n, CHUNK_ROWS):
        w = weight[lo : lo + CHUNK_ROWS] * voter[lo : lo + CHUNK_ROWS, None].astype(np.float64)
        j = nbr[lo : lo + CHUNK_ROWS].astype(np.int64)
        degree += np.bincount(j.ravel(), weights=w.ravel(), minlength=m)
        ztz += np.bincount(
            (j[:, :, None] * m + j[:, None, :]).ravel(),
            weights=(w[:, :, None] * w[:, None, :]).ravel(),
            minlength=m * m,
        )
    inv = np.where(degree > 0, 1.0 / np.sqrt(np.maximum(degree, 1e-300)), 0.0)
    M = inv[:, None] * ztz.reshape(m, m) * inv[None]
    n_eig = min(n_eig, m)
    with threadpool_limits(1, user_api="blas"):  # m x m is small; BLAS's threads spin on shared cores
        mu, V = scipy.linalg.eigh((M + M.T) / 2, subset_by_index=[m - n_eig, m - 1])
    mu, V = mu[::-1], V[:, ::-1]
    lift = inv[:, None] * V / np.sqrt(np.maximum(mu, 1e-12))[None]
    return AnchorSpectrum(np.clip(1.0 - mu, 0.0, 2.0), nbr, weight, lift, m)


def planted_heatmaps(
    n: int, minority: float = 0.01, noise: float = 0.35, seed: int = 0, out: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Heatmap-like planted data, (n, 3, 7, 7) float32, and its planted group (0..3) per row.

    Two classes, each with its own 7x7 relevance blob; a shortcut colour channel (0 or 1) that
    agrees with the class except on a `minority` fraction. Group = class * 2 + channel. ChunkedRows are
    written chunk by chunk into `out` when given (e.g. an np.memmap for 10M rows).
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:7, 0:7]
    blobs = np.stack([np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 4.0) for cy, cx in ((2, 2), (4, 5))])
    out = np.empty((n, 3, 7, 7), np.float32) if out is None else out
    group = np.empty(n, np.int64)
    for lo in range(0, n, CHUNK_ROWS):
        b = min(CHUNK_ROWS, n - lo)
        y = rng.integers(0, 2, b)
        s = np.where(rng.random(b) < minority, 1 - y, y)
        H = noise * rng.standard_normal((b, 3, 7, 7), dtype=np.float32)
        H[np.arange(b), s] += blobs[y]
        H[:, 2] *= 0.3  # the unused channel: noise only, weaker
        out[lo : lo + b], group[lo : lo + b] = H, y * 2 + s
    return out, group


def planted_centres(
    n: int, flip: float = 0.01, noise: float = 0.6, d: int = 147, seed: int = 0, out: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Two planted groups per class, (n, d) float32 rows and the group (class * 2 + pattern) per row.

    Class y is fair; a pattern equals y except on a `flip` fraction; each row is one of two N(0, I)
    centres, picked by the pattern, plus `noise` * N(0, I). Dividing each row by its max |value|
    (the paper's normalisation) stretches each cluster along its centre, so a graph that follows
    the data's top principal directions splits it (issue 31). ChunkedRows are written chunk by chunk into
    `out` when given (an np.memmap for 10M rows).
    """
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((2, d), dtype=np.float32)
    out = np.empty((n, d), np.float32) if out is None else out
    group = np.empty(n, np.int64)
    for lo in range(0, n, CHUNK_ROWS):
        b = min(CHUNK_ROWS, n - lo)
        y = rng.integers(0, 2, b)
        s = np.where(rng.random(b) < flip, 1 - y, y)
        out[lo : lo + b] = centres[s] + noise * rng.standard_normal((b, d), dtype=np.float32)
        group[lo : lo + b] = y * 2 + s
    return out, group
