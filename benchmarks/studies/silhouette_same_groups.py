"""Recompute the kmeans_silhouette entry (clustering.input both) with this checkout's code on each full-dev
family-seed's cached upstream (nothing written) and compare with the grouping `pick_scores.py collect` saved
there (runs/pick-scores/full-dev, made by the code before the one-thread FAISS and one-matrix silhouettes).

    python benchmarks/studies/silhouette_same_groups.py zoo_colour,zoo_patch,... 0,1 \
        [--cache runs/zoo-cache] [--collected runs/pick-scores/full-dev]
"""

import argparse
import time
from pathlib import Path

import numpy as np

from exmap_ray.cache import StageCache
from exmap_ray.pipeline import preflight
from exmap_ray.resources import resolve_resources
from exmap_ray.spec import SHIPPED, load_spec
from exmap_ray.stages import stage_keys, group_context
from exmap_ray.heatmaps.extract import HeatmapShards
from exmap_ray.groups.sources import infer_groups

ap = argparse.ArgumentParser()
ap.add_argument("families")
ap.add_argument("seeds")
ap.add_argument("--cache", default="runs/zoo-cache", help="the stage cache holding the family-seeds' upstreams")
ap.add_argument("--collected", default="runs/pick-scores/full-dev", type=Path, help="pick_scores.py collect's folder")
args = ap.parse_args()
fams = args.families.split(",")
seeds = [int(s) for s in args.seeds.split(",")]
cache = StageCache(args.cache)
same = 0
n = 0
for fam in fams:
    for seed in seeds:
        words = ["groups.pick_among=[]", "clustering.input=both", "clustering.method=kmeans_silhouette", f"seed={seed}"]
        v = resolve_resources(load_spec(SHIPPED / f"{fam}.yaml", words))
        data = preflight(v, check_model=False)
        st = stage_keys(v, cache)
        hm = HeatmapShards(st["heatmaps"].dir)
        if not st["heatmaps"].done:  # the cache's own completion mark
            print(fam, seed, "no cached heatmaps", st["heatmaps"].dir)
            continue
        ctx = group_context(
            v,
            data.val.y,
            data.val.group,
            hm.features(),
            hm.logits(),
            hm.for_clustering(whole_below=50000, normalized=v.clustering.normalize),
        )
        t = time.perf_counter()
        g, info = infer_groups("exmap", ctx)
        dt = time.perf_counter() - t
        old = np.load(args.collected / f"{fam}_seed{seed}.npz")["both-silhouette/pseudo"]
        ok = bool((old == g).all())
        same += ok
        n += 1
        print(fam, seed, "same" if ok else "DIFFERENT", round(dt, 2), "s", info.get("scopes"), flush=True)
print(f"{same}/{n} identical")
