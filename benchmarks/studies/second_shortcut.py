"""Why the pairs' second shortcut is not found, and what finds it. Offline, on what `pick_scores.py collect
--keep-features` saved (val features, val true groups, each entry's pseudo groups).

    python benchmarks/studies/second_shortcut.py runs/pick-scores/full-dev

Printed per family (mean over the collected seeds), the figures of docs/zoo_protocol.md ("A second
shortcut inside the groups"); true groups are read here to diagnose, never to choose:
- `y x a1`: DFR on the true class x first shortcut (pairs), beside the oracle's groups;
- `probe a2`: 3-fold balanced accuracy of a logistic probe reading the second shortcut from the features;
- `kmeans ARI`: k-means (k = 2) inside each large true (class, first shortcut) cell, ARI against the second
  shortcut there (the median and the maximum over cells);
- `ica cells`: in how many large cells the independent component with the largest Ashman's D, among those
  with a minority share of 3-25%, is the second shortcut (ARI >= 0.5), and its ARI there;
- `err split`: every family: the both-merge entry's groups split by a cross-fitted DFR's val errors.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA, FastICA
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import adjusted_rand_score as ari
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import cross_val_predict

    from exmap_ray.groups.formation import SPLIT_SHARE, _two_modes
    from exmap_ray.hashing import RETRAIN_SEED
    from exmap_ray.retrain.base import RETRAINERS
    from exmap_ray.selection import worst_group_acc
    from exmap_ray.spec import SHIPPED, load_spec, stage_seed
    from union_dfr import collected, print_family_table  # this folder is on sys.path when the script runs

    src = Path((argv or sys.argv[1:])[0])
    rows: dict[str, dict[str, list[float]]] = {}
    notes = []
    for path, z, meta, fam in collected(src):
        seed = meta["seed"]
        spec = load_spec(SHIPPED / f"{meta['family']}.yaml", [f"seed={seed}"])
        r = RETRAINERS.get("dfr")
        cfg, rseed = r.config(spec), stage_seed(seed, RETRAIN_SEED)
        y, g, ty, tg = z["y"], z["group"], z["test_y"], z["test_group"]
        Xv, Xt = z["val_features"].astype(np.float64), z["test_features"]

        def add(row, v):
            rows.setdefault(row, {}).setdefault(fam, []).append(float(v))

        def wga(groups, c=cfg):
            return worst_group_acc(r.fit(Xv, y, groups, c, rseed).predict(Xt), ty, tg)

        add("oracle DFR", meta["oracle"])
        base = np.unique(z["both-merge/pseudo"], return_inverse=True)[1].ravel()
        add("both-merge", wga(base))
        fold, err = np.random.default_rng(seed).integers(0, 2, len(y)), np.zeros(len(y), np.int64)
        loose = dataclasses.replace(cfg, own=dataclasses.replace(cfg.own, whole_group_max=5))
        for f in (0, 1):  # cross-fitted: each half's errors from a fit on the other half
            tr = fold != f
            err[~tr] = r.fit(Xv[tr], y[tr], base[tr], loose, rseed).predict(Xv[~tr]) != y[~tr]
        split = base * 2 + err
        for q in np.unique(split):  # error parts under 6 members stay with their group
            if q % 2 and (split == q).sum() < 6:
                split[split == q] = q - 1
        add("both-merge split by its DFR's val errors", wga(np.unique(split, return_inverse=True)[1].ravel()))
        if "_" not in fam:  # a single shortcut: the rest is about a pair's second one
            continue
        a1, a2 = (g // 2) % 2, g % 2
        add("DFR on true class x first shortcut", wga(y * 2 + a1))
        probe = cross_val_predict(LogisticRegression(max_iter=2000), Xv, a2, cv=3)
        add("probe a2 (balanced accuracy)", balanced_accuracy_score(a2, probe))
        km, found = [], []
        for c in (0, 1):
            for v in (0, 1):
                cell = (y == c) & (a1 == v)
                if cell.sum() < 300:
                    continue
                Xc, t = Xv[cell], a2[cell]
                km.append(ari(t, KMeans(2, n_init=5, random_state=0).fit_predict(Xc - Xc.mean(0))))
                S = FastICA(20, random_state=0, max_iter=1000, whiten="unit-variance").fit_transform(
                    PCA(20, random_state=0).fit_transform(Xc)
                )
                best = None
                for j in range(S.shape[1]):
                    d, share, gm = _two_modes(S[:, j], 0)
                    if SPLIT_SHARE[0] <= share <= SPLIT_SHARE[1] and (best is None or d > best[0]):
                        best = (d, ari(t, gm.predict(S[:, [j]])))
                found.append(best[1] if best else 0.0)
        add("kmeans ARI in cells (median)", np.median(km))
        add("kmeans ARI in cells (max)", np.max(km))
        notes.append(f"{fam} seed {seed}: top-D ICA component ARI per large cell {np.round(found, 2).tolist()}")
        print(path.name, "done", file=sys.stderr, flush=True)
    print_family_table({k: v for k, v in rows.items() if set(v) == set(rows["oracle DFR"])})
    print()
    print_family_table({k: v for k, v in rows.items() if set(v) != set(rows["oracle DFR"])})
    print("\n".join(notes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
