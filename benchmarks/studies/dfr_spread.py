"""Is the test-WGA spread between a sweep's k values the DFR fit's randomness, or the groupings?

    python benchmarks/studies/dfr_spread.py tune_specs/cmnist_sweep.yaml --cache runs/bench-cache --seed 2

For each k (global scope, the spec's other settings) this refits ExMap's DFR on the cached pseudo groups
with R different DFR seeds and prints the test WGA's mean, SD and range, beside what the grouping makes
of the balanced fits: the number of pseudo groups, the smallest one (every group is subsampled to it),
and so the size of each balanced fit. True groups are used only to score and to count how many pseudo
groups the val minority is spread over. ERM, features and heatmaps must be in the cache (run the sweep
or `exmap-ray run` with `--cache` first); missing clusters are computed here, without Ray.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from exmap_ray.pipeline import preflight
from exmap_ray.resources import resolve_resources
from exmap_ray.retrain import RETRAINERS, fit_dfr
from exmap_ray.spec import load_spec
from exmap_ray.stages import compute_upstream, stage_keys
from exmap_ray.cache import StageCache


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("spec")
    ap.add_argument("--cache", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--k", default="2,3,4,6,8,auto", help="comma-separated clustering.k values")
    ap.add_argument("--repeats", type=int, default=8, help="DFR seeds per k")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="extra spec overrides")
    args = ap.parse_args(argv)
    base = [f"seed={args.seed}", "clustering.scope=global", *args.sets]
    spec = resolve_resources(load_spec(args.spec, base))  # this machine's device, as the run that cached them
    cache = StageCache(args.cache)
    stages = stage_keys(spec, cache)
    if not (stages["erm"].done and stages["heatmaps"].done):
        print(
            f"no finished ERM and heatmaps for this spec and seed in {args.cache}; run `exmap-ray tune "
            f"{args.spec} --cache {args.cache} --set seed={args.seed}` first",
            file=sys.stderr,
        )
        return 2
    data = preflight(spec)
    t = data.test
    # the val minority: true groups holding under half of their class (analysis only)
    g_val, y_val = data.val.group, data.val.y
    rare = [g for g in np.unique(g_val) if (g_val == g).sum() < 0.5 * (y_val == y_val[g_val == g][0]).sum()]
    minority = np.isin(g_val, rare)
    print(
        f"# {args.spec} seed {args.seed}, global scope, {args.repeats} DFR seeds per k; "
        f"val minority: {int(minority.sum())} images in {len(rare)} true groups"
    )
    print(
        f"{'k':>5} {'groups':>6} {'smallest':>8} {'fit size':>8} {'minority in':>11} "
        f"{'WGA mean':>8} {'sd':>6} {'min':>6} {'max':>6}"
    )
    for k in args.k.split(","):
        s_k = resolve_resources(load_spec(args.spec, [*base, f"clustering.k={k}"]))
        up = compute_upstream(s_k, data, cache)
        pseudo = up.pseudo
        sizes = np.bincount(pseudo)
        sizes = sizes[sizes > 0]
        holders = len(np.unique(pseudo[minority]))
        wga = []
        for r in range(args.repeats):
            m = fit_dfr(up.val_features, data.val.y, pseudo, RETRAINERS.get("dfr").config(s_k), 1000 + r)
            pred = m.predict(up.test_features)
            wga.append(min(float((pred[t.group == g] == t.y[t.group == g]).mean()) for g in np.unique(t.group)))
        print(
            f"{k:>5} {len(sizes):>6} {sizes.min():>8} {sizes.min() * len(sizes):>8} {holders:>8} grp "
            f"{np.mean(wga):>8.3f} {np.std(wga):>6.3f} {min(wga):>6.3f} {max(wga):>6.3f}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
