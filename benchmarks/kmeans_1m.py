"""k-means on 1M x 147 planted points, k = 8: wall time of `exmap_ray.clustering.kmeans` and its seeding.

    python benchmarks/kmeans_1m.py [--n 1000000] [--seeds 0 1 2]

The data: 8 Gaussian clusters (centres N(0, 9 I), unit noise) in 147 dimensions, the demo's 3x7x7
heatmap size. For each seed it prints the time of three k-means++ seedings, the time of the whole
`kmeans(X, 8)` call (3 restarts, 25 iterations), the ARI against the planted labels, and how many
of the 8 true clusters each seeding hit. Asserts nothing; run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from exmap_ray.clustering import kmeans, kmeanspp_init  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()
    from sklearn.metrics import adjusted_rand_score

    rng = np.random.default_rng(0)
    d, k = 147, 8
    centres = rng.normal(size=(k, d)).astype(np.float32) * 3
    truth = rng.integers(k, size=args.n)
    X = centres[truth] + rng.normal(size=(args.n, d)).astype(np.float32)
    print(f"N = {args.n:,}, d = {d}, k = {k}")
    for seed in args.seeds:
        r = np.random.default_rng(seed)
        t = time.perf_counter()
        inits = [kmeanspp_init(X, k, r) for _ in range(3)]
        seeding = time.perf_counter() - t
        hit = [len(set(((c[:, None] - centres[None]) ** 2).sum(-1).argmin(1))) for c in inits]
        t = time.perf_counter()
        labels = kmeans(X, k, 25, 3, seed)
        total = time.perf_counter() - t
        print(
            f"seed {seed}: kmeans {total:.1f} s (3 seedings alone {seeding:.1f} s); "
            f"ARI {adjusted_rand_score(truth, labels):.3f}; true clusters hit per seeding {hit}"
        )


if __name__ == "__main__":
    main()
