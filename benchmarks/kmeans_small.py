"""The kmeans_silhouette clusterer's two parts on small inputs: FAISS k-means on one OpenMP thread against
FAISS's own thread count, and the silhouettes from one distance matrix against sklearn's silhouette_score
per labelling. Random Gaussian rows; k = 2..10 (or --ks), 3 restarts of 25 iterations each, as the shipped
spec's.

    python benchmarks/kmeans_small.py [--shapes 3000x1100,5000x1100,10000x1100,3000x588,10000x147,30000x147]
    python benchmarks/kmeans_small.py --shapes 10000x1100,20000x1100,50000x1100 --ks 2,6,10
"""

from __future__ import annotations

import argparse
import os
import time

import faiss
import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="3000x1100,5000x1100,10000x1100,3000x588,10000x147,30000x147")
    ap.add_argument("--ks", default="2,3,4,5,6,7,8,9,10", help="the k values, each fitted once per setting")
    args = ap.parse_args()
    ks = [int(k) for k in args.ks.split(",")]
    import importlib

    from sklearn.metrics import silhouette_score

    from exmap_ray.clustering.clusterers import SILHOUETTE_SAMPLE, silhouettes

    km = importlib.import_module("exmap_ray.clustering.kmeans")
    load, threads = os.getloadavg()[0], faiss.omp_get_max_threads()
    print(f"k = {args.ks}; {os.cpu_count()} cores, load average {load:.1f}, FAISS threads {threads}")
    print(
        "| N x d | k-means, FAISS's threads | k-means, one thread | same labels | silhouettes, sklearn | one matrix |"
    )
    print("|---|---|---|---|---|---|")
    limit = km.FAISS_ONE_THREAD_MAX
    for shape in args.shapes.split(","):
        n, d = map(int, shape.split("x"))
        X = np.random.default_rng(0).standard_normal((n, d)).astype(np.float32)
        times, labels = [], []
        for one in (False, True):
            km.FAISS_ONE_THREAD_MAX = n * d if one else 0
            t = time.perf_counter()
            labels.append({k: km.kmeans(X, k, 25, 3, 0) for k in ks})
            times.append(time.perf_counter() - t)
        km.FAISS_ONE_THREAD_MAX = limit
        same = all((labels[0][k] == labels[1][k]).all() for k in labels[0])
        sample = min(n, SILHOUETTE_SAMPLE)
        t = time.perf_counter()
        for lab in labels[1].values():
            silhouette_score(X, lab, sample_size=sample, random_state=0)
        t_sk = time.perf_counter() - t
        t = time.perf_counter()
        silhouettes(X, labels[1], SILHOUETTE_SAMPLE, 0)
        t_one = time.perf_counter() - t
        print(f"| {n:,} x {d:,} | {times[0]:.2f} s | {times[1]:.2f} s | {same} | {t_sk:.2f} s | {t_one:.2f} s |")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
