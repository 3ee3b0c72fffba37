"""Which representation and clustering find every true group of a multi-shortcut set? (A probe for issue 15.)

    python benchmarks/studies/multi_shortcut_probe.py cmnist_multi --cache DIR [--set KEY=VALUE ...]

Reads the val heatmaps and the val penultimate features (one pass, the heatmaps stage) that
`exmap-ray run SPEC --cache DIR` left in the cache (nothing is trained here), clusters them in
several ways and prints, for each, the number of pseudo groups (class x cluster, small ones merged
as the pipeline merges them), the ARI and each true group's recovery (metrics.recovery). The true
groups are used for this scoring only. Ways:

- spectral clustering, eigengap k (the paper's), global and local, on the heatmaps, the features,
  and both (`clustering.input: both`: each row divided by its max |value|, then side by side);
- spectral clustering with a fixed larger k;
- a recursive split: a cluster is split again (eigengap k on its own kNN graph) while its gap,
  relative to the eigenvalue above it, is at least THRESH, up to DEPTH levels (on the heatmaps;
  with --recursive-all on every representation).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

from exmap_ray.clustering import ChunkedRows
from exmap_ray.clustering.clusterers import spectral_clusters
from exmap_ray.groups.formation import merge_small
from exmap_ray.data import build_dataset
from exmap_ray.groups.sources import side_by_side
from exmap_ray.heatmaps.extract import HeatmapShards
from exmap_ray.metrics import agreement
from exmap_ray.resources import resolve_resources
from exmap_ray.spec import load_spec
from exmap_ray.stages import stage_keys
from exmap_ray.cache import StageCache


def spectral(X: np.ndarray, cspec, k: int | None = None, seed: int = 0):
    """The pipeline's spectral clusterer (eigengap k unless `k`): labels, eigenvalues, k."""
    lab, info = spectral_clusters(X, dataclasses.replace(cspec, k=k or "auto"), seed)
    return lab, np.asarray(info["eigenvalues"]), info["k"]


def recursive(X, cspec, idx, depth, seed, parts, min_size, thresh, max_depth):
    """Split `idx` by its own eigengap while the gap is clear; leaves go to `parts`."""
    if depth >= max_depth or len(idx) < 2 * min_size:
        parts.append(idx)
        return
    lab, w, k = spectral(X[idx], cspec, seed=seed)
    gap = (w[k] - w[k - 1]) / max(w[k], 1e-12)
    if gap < thresh or np.bincount(lab).min() < min_size // 2:
        parts.append(idx)
        return
    for c in range(k):
        recursive(X, cspec, idx[lab == c], depth + 1, seed + 7 * c + 1, parts, min_size, thresh, max_depth)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("spec")
    ap.add_argument("--cache", type=Path, required=True)
    ap.add_argument("--set", dest="sets", action="append", default=[])
    ap.add_argument(
        "--recursive-all",
        action="store_true",
        help="run the recursive split on every representation, not only the heatmaps",
    )
    args = ap.parse_args(argv)
    spec = resolve_resources(load_spec(args.spec, args.sets))
    hm = stage_keys(spec, StageCache(args.cache), ["heatmaps"])["heatmaps"]
    if not hm.done:
        print(
            f"no finished heatmaps for this spec in {args.cache} (looked for {hm.dir}); run "
            f"`exmap-ray run {args.spec} --cache {args.cache}` with the same --set values first",
            file=sys.stderr,
        )
        return 2
    store = HeatmapShards(hm.dir)
    data = build_dataset(spec.dataset, spec.seed)
    y, g, names = data.val.y, data.val.group, data.group_names
    reps = {
        "heatmaps": ChunkedRows(store.load(), True).materialize(),
        "features": ChunkedRows(store.features(), True).materialize(),
    }
    reps["heatmaps+features"] = side_by_side(store.load(), store.features())  # the pipeline's input `both`
    cspec, min_size = spec.clustering, spec.clustering.min_group_size
    print(
        f"{spec.name} seed {spec.seed}: {len(y)} val images; true group sizes "
        + ", ".join(f"{n} {c}" for n, c in zip(names, np.bincount(g, minlength=len(names))))
    )
    print(f"{'representation / clustering':<52}{'groups':>7}{'ARI':>7}{'worst':>7}  recovery per true group")

    def show(tag, clusters):
        cl, _ = merge_small(X, y, clusters, min_size)
        _, grp = np.unique(y * (cl.max() + 1) + cl, return_inverse=True)
        a = agreement(grp.ravel(), g, names)
        print(
            f"{tag:<52}{grp.max() + 1:>7}{a['ari']:>7.3f}{a['worst_recovery']:>7.2f}  "
            + " ".join(f"{v:.2f}" for v in a["recovery"].values()),
            flush=True,
        )

    t0 = time.time()
    for rep, X in reps.items():
        lab, _, k = spectral(X, cspec)
        show(f"{rep}: spectral global, eigengap k={k}", lab)
        show(f"{rep}: spectral global, k=8", spectral(X, cspec, k=8)[0])
        local = np.zeros(len(y), np.int64)
        for c in np.unique(y):
            i = np.flatnonzero(y == c)
            local[i] = spectral(X[i], cspec, seed=int(c))[0]
        show(f"{rep}: spectral local, eigengap k", local)
        if rep == "heatmaps" or args.recursive_all:
            for thresh, depth in ((0.1, 2), (0.3, 2), (0.3, 3)):
                parts: list = []
                recursive(X, cspec, np.arange(len(y)), 0, 0, parts, 15, thresh, depth)
                lab = np.zeros(len(y), np.int64)
                for j, p in enumerate(parts):
                    lab[p] = j
                show(f"{rep}: recursive split, gap >= {thresh}, depth {depth}", lab)
    print(f"({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
