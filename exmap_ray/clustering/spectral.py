"""The spectral maths the paper's clustering uses: a kNN graph, the normalised Laplacian's smallest
eigenvalues, and k by the largest eigengap.

    from exmap_ray.clustering.spectral import eigengap_k, knn_affinity, laplacian_spectrum
    eigvals, V = laplacian_spectrum(knn_affinity(X))
    k = eigengap_k(eigvals, k_max=10)
"""

from __future__ import annotations

import math

import faiss
import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import eigsh

N_EIGS = 13  # the paper inspects the 13 smallest eigenvalues
DENSE_EIG_MAX = 2500  # below this a dense eigendecomposition is faster and exact


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
