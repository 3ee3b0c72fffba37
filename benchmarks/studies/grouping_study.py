"""Which feature groupings raise the ceiling? Offline, on what `pick_scores.py collect --keep-features` saved.

    python benchmarks/studies/grouping_study.py runs/pick-scores/full-dev [--methods a,b,...]

Each method forms val pseudo groups from the saved penultimate val features alone (no heatmaps are saved),
through the project's own `pseudo_groups` (class x cluster, small groups merged), then the family's DFR is
fitted on them exactly as a row is (`exmap_ray.retrain`, the spec's keys and seed) and scored on test.
Printed per family (mean over the collected seeds): each collected entry's test WGA beside each method's.
This is a ceiling study (test WGA is read to compare groupings); a grouping worth keeping still has to be
chosen label-free and judged on the protocol's judge seeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np


def pca(X: np.ndarray, d: int) -> np.ndarray:
    Xc = X - X.mean(0)
    _, _, vt = np.linalg.svd(Xc, full_matrices=False)
    return Xc @ vt[:d].T


METHODS = {  # name -> (cluster settings, PCA dimensions or None)
    "features-silhouette": ({"method": "kmeans_silhouette", "scope": "global"}, None),
    "features-silhouette-local": ({"method": "kmeans_silhouette", "scope": "local"}, None),
    "pca2-silhouette-local": ({"method": "kmeans_silhouette", "scope": "local", "normalize": False}, 2),
    "pca5-silhouette-local": ({"method": "kmeans_silhouette", "scope": "local", "normalize": False}, 5),
    "pca10-silhouette": ({"method": "kmeans_silhouette", "scope": "global", "normalize": False}, 10),
    "pca10-silhouette-local": ({"method": "kmeans_silhouette", "scope": "local", "normalize": False}, 10),
    "pca2-gmm-local": ({"method": "gmm", "scope": "local", "normalize": False}, 2),
    "pca5-gmm-local": ({"method": "gmm", "scope": "local", "normalize": False}, 5),
    # over-clustering over all points: more clusters than the silhouette's k, so a second shortcut's
    # minority inside a (class, first shortcut) cluster may get clusters of its own
    "features-k4": ({"method": "kmeans", "scope": "global", "k": 4}, None),
    "features-k6": ({"method": "kmeans", "scope": "global", "k": 6}, None),
    "features-k8": ({"method": "kmeans", "scope": "global", "k": 8}, None),
    "features-k12": ({"method": "kmeans", "scope": "global", "k": 12}, None),
    "features-silhouette-k2x": ({"method": "kmeans_silhouette", "scope": "global"}, "2x"),
}


def local_pca(X, y, d):
    """PCA per class (as GEORGE reduces each class apart), rows kept in place."""
    out = np.zeros((len(X), d), np.float32)
    for c in np.unique(y):
        out[y == c] = pca(X[y == c], d)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", type=Path)
    ap.add_argument("--entries", default="shipped,both,both-merge,both-silhouette")
    ap.add_argument("--methods", default=",".join(METHODS))
    a = ap.parse_args(argv)
    from exmap_ray.groups.formation import pseudo_groups
    from exmap_ray.retrain.base import RETRAINERS
    from exmap_ray.selection import worst_group_acc
    from exmap_ray.hashing import RETRAIN_SEED
    from exmap_ray.spec import SHIPPED, load_spec, stage_seed
    from union_dfr import collected, print_family_table  # this folder is on sys.path when the script runs

    entries, methods = a.entries.split(","), a.methods.split(",")
    rows: dict[str, dict[str, list[float]]] = {}
    for path, z, meta, fam in collected(a.dir):
        family, seed = meta["family"], meta["seed"]
        spec = load_spec(SHIPPED / f"{family}.yaml", [f"seed={seed}"])
        r = RETRAINERS.get("dfr")
        y, ty, tg = z["y"], z["test_y"], z["test_group"]
        Xv, Xt = z["val_features"], z["test_features"]

        def add(name, v):
            rows.setdefault(name, {}).setdefault(fam, []).append(v)

        by_test = {m["entry"]: m["test_wga"] for m in meta["entries"]}
        for e in entries:
            add(e, by_test[e])
        for name in methods:
            keys, d = METHODS[name]
            cspec = dataclasses.replace(spec.clustering, **keys)
            if d == "2x":  # the silhouette's k, then k-means again at twice that k
                _, info = pseudo_groups(Xv, y, cspec, seed, what="features")
                k2 = 2 * int(info["scopes"]["global"]["k"])
                cspec, X = dataclasses.replace(cspec, method="kmeans", k=k2), Xv
            else:
                X = Xv if d is None else (local_pca(Xv, y, d) if keys["scope"] == "local" else pca(Xv, d))
            groups, _ = pseudo_groups(X, y, cspec, seed, what="features")
            head = r.fit(Xv, y, groups, r.config(spec), stage_seed(seed, RETRAIN_SEED))
            add(name, worst_group_acc(head.predict(Xt), ty, tg))
        add("oracle DFR", meta["oracle"])
        print(path.name, {k: round(v[fam][-1], 3) for k, v in rows.items()}, file=sys.stderr, flush=True)
    print_family_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
