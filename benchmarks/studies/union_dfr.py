"""Several groupings in one last-layer fit: does DFR over the union of `groups.pick_among`'s groupings beat
picking one? Offline, on what `pick_scores.py collect --keep-features` saved.

    python benchmarks/studies/union_dfr.py runs/pick-scores/quick-ens [--entries shipped,both,...]

Per family (mean over the collected seeds) the test WGA of:
- each entry's own DFR (as collected: the pipeline's fit);
- `mean decision`: the entries' DFR heads averaged (the same standardisation, so this is their weights
  averaged: one linear head, each grouping's balanced fits in equal share);
- `union reweight`: one L1 logistic fit on all of val, each point weighted by the mean over the groupings of
  1 / its group's size (every group of every grouping weighs the same), C chosen on random halves by the
  worst group over every grouping's groups (pooled held-out predictions, as `sweep_pooled_worst_group_acc`);
- `union subsample`: DFR's balanced subsampling, each fit balanced by one grouping in turn, the same C rule;
- `oracle reweight`: the same reweighted fit on the true val groups (to calibrate the fits against DFR's).

True groups enter only the oracle row and the scoring.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from exmap_ray.retrain.dfr import _fit, balanced_subsample, group_weights
from exmap_ray.selection import pooled_worst_over_groupings, worst_group_acc as wga

C_GRID = [1.0, 0.7, 0.3, 0.1, 0.07, 0.03, 0.01]


def union_fit(Xv, y, groupings, mode, seed=0, repeats=5, final=20):
    rng, split_rng = np.random.default_rng([seed, 1]), np.random.default_rng([seed, 0])
    mean, std = Xv.mean(0), Xv.std(0) + 1e-8
    X = (Xv - mean) / std

    def weights(ix):
        return np.mean([group_weights(g[ix]) for g in groupings], 0)

    def subsample(ix, turn):
        g = groupings[turn % len(groupings)]
        return ix[balanced_subsample(g[ix], rng)]

    halves = []
    preds = {C: [] for C in C_GRID}
    for r in range(repeats):
        perm = split_rng.permutation(len(y))
        a, b = perm[: len(y) // 2], perm[len(y) // 2 :]
        halves.append(b)
        for C in C_GRID:
            if mode == "reweight":
                clf = _fit(X[a], y[a], C, int(rng.integers(2**31 - 1)), weights(a))
            else:
                sub = subsample(a, r)
                clf = _fit(X[sub], y[sub], C, int(rng.integers(2**31 - 1)))
            preds[C].append(clf.predict(X[b]))
    score = {C: pooled_worst_over_groupings(halves, preds[C], y, groupings, 3)[0] for C in C_GRID}
    best = max(C_GRID, key=lambda C: (score[C], C))
    allix = np.arange(len(y))
    if mode == "reweight":
        clf = _fit(X, y, best, int(rng.integers(2**31 - 1)), weights(allix))
        coef, icpt = clf.coef_, clf.intercept_
    else:
        fits = [
            _fit(X[s], y[s], best, int(rng.integers(2**31 - 1))) for s in (subsample(allix, t) for t in range(final))
        ]
        coef, icpt, clf = np.mean([f.coef_ for f in fits], 0), np.mean([f.intercept_ for f in fits], 0), fits[0]
    return lambda F: _predict(((F - mean) / std) @ coef.T + icpt, clf.classes_)


def _predict(d, classes):
    return classes[(d[:, 0] > 0).astype(int) if d.shape[1] == 1 else d.argmax(1)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", type=Path)
    ap.add_argument("--entries", default="shipped,both,both-merge,both-silhouette")
    ap.add_argument("--union", default="both,both-merge,both-silhouette", help="the groupings used together")
    a = ap.parse_args(argv)
    entries, union = a.entries.split(","), a.union.split(",")
    rows: dict[str, dict[str, list[float]]] = {}
    for path, z, meta, fam in collected(a.dir):
        y, ty, tg = z["y"], z["test_y"], z["test_group"]
        classes = np.unique(y)

        def add(name, value):
            rows.setdefault(name, {}).setdefault(fam, []).append(value)

        for e in entries:
            add(e, wga(_predict(z[f"{e}/test_decision"], classes), ty, tg))
        add(
            "mean decision (union entries)",
            wga(_predict(np.mean([z[f"{e}/test_decision"] for e in union], 0), classes), ty, tg),
        )
        groupings = [z[f"{e}/pseudo"] for e in union]
        Xv, Xt = z["val_features"], z["test_features"]
        for mode in ("reweight", "subsample"):
            add(f"union {mode}", wga(union_fit(Xv, y, groupings, mode)(Xt), ty, tg))
        add("oracle reweight", wga(union_fit(Xv, y, [z["group"]], "reweight")(Xt), ty, tg))
        add("oracle DFR (collected)", meta["oracle"])
        print(path.name, {k: round(v[fam][-1], 3) for k, v in rows.items()}, file=sys.stderr, flush=True)
    print_family_table(rows)
    return 0


def collected(folder: Path):
    """Each npz `pick_scores.py collect` wrote: (path, its arrays, its meta, the family less `zoo_`)."""
    for path in sorted(folder.glob("*.npz")):
        z = np.load(path)
        meta = json.loads(str(z["meta"]))
        yield path, z, meta, meta["family"].removeprefix("zoo_")


def print_family_table(rows: dict[str, dict[str, list[float]]]) -> None:
    """rows: row name -> family -> one value per seed; printed as a markdown table of the seed means."""
    fams = sorted(next(iter(rows.values())))
    print("| row | " + " | ".join(fams) + " | mean |")
    print("|---" * (len(fams) + 2) + "|")
    for name, per in rows.items():
        vals = [float(np.mean(per[f])) for f in fams]
        print(f"| {name} | " + " | ".join(f"{v:.3f}" for v in vals) + f" | **{np.mean(vals):.3f}** |")


if __name__ == "__main__":
    sys.exit(main())
