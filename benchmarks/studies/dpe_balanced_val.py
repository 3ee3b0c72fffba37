"""Why the DPE row is near ERM here: DPE's label-free variant trains each member on a class-balanced
random subset of val, so it breaks a shortcut only where val's classes are already balanced across the
shortcut. Waterbirds' val is (its backgrounds are balanced within each bird class); C-MNIST's and the
zoo's val carry the train correlation (rho). A diagnostic, not a row: it reads true groups to cut val.

    python benchmarks/studies/dpe_balanced_val.py --spec cmnist --seed 0 --cache runs/cmnist-cache

On one seed's cached upstream (ERM and features from the stage cache; nothing is trained but heads), fits
the same DPE config three times and prints the test WGA of each:
  1. on all of val, groups = classes (bench's "DPE (no group labels)" row);
  2. on a val subset balanced within each class across its true groups (Waterbirds' val kind), groups =
     classes: still no group label enters DPE, only the subset differs;
  3. DFR with the true groups on all of val (the oracle row), for scale.
"""

from __future__ import annotations

import argparse

import numpy as np


def balanced_subset(y: np.ndarray, g: np.ndarray, seed: int) -> np.ndarray:
    """Indices: within each class, every true group cut down to the class's smallest group."""
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(y):
        groups = [np.flatnonzero((y == c) & (g == k)) for k in np.unique(g[y == c])]
        n = min(len(ix) for ix in groups)
        keep += [rng.choice(ix, n, replace=False) for ix in groups]
    return np.sort(np.concatenate(keep))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--spec", default="cmnist")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", required=True)
    ap.add_argument("--set", action="append", default=[])
    a = ap.parse_args()

    from exmap_ray.cache import StageCache
    from exmap_ray.metrics import evaluate
    from exmap_ray.pipeline import evaluate_row, preflight
    from exmap_ray.resources import resolve_resources
    from exmap_ray.retrain import RETRAINERS
    from exmap_ray.hashing import RETRAIN_SEED
    from exmap_ray.spec import SHIPPED, load_spec, stage_seed
    from exmap_ray.stages import Timer, compute_upstream

    spec = resolve_resources(load_spec(SHIPPED / f"{a.spec}.yaml", [*a.set, f"seed={a.seed}"]))
    data = preflight(spec, check_model=False)
    up = compute_upstream(spec, data, StageCache(a.cache), Timer())
    val, test = data.val, data.test
    dpe = RETRAINERS.get("dpe")

    def dpe_wga(idx: np.ndarray) -> float:
        seed = stage_seed(spec.seed, RETRAIN_SEED)
        head = dpe.fit(up.val_features[idx], val.y[idx], val.y[idx], dpe.config(spec), seed)
        pred = head.predict(up.test_features)
        return evaluate(pred, test.y, test.group, data.group_names, data.train.group)["worst_group_acc"]

    every = np.arange(len(val.y))
    sub = balanced_subset(val.y, val.group, a.seed)
    oracle = evaluate_row(spec, data, up, "true", "dfr", groups=val.group).test["worst_group_acc"]
    print(f"{a.spec} seed {a.seed}: val {len(every)} images, the balanced subset {len(sub)}")
    print(f"  DPE, all of val, groups = classes:            test WGA {dpe_wga(every):.3f}")
    print(f"  DPE, val balanced within class, groups = classes: test WGA {dpe_wga(sub):.3f}")
    print(f"  oracle DFR (true groups, all of val):         test WGA {oracle:.3f}")


if __name__ == "__main__":
    main()
