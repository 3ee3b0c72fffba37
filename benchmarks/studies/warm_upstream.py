"""Compute the zoo's upstream (ERM, features, heatmaps) into a stage cache ahead of a judge run, and print
nothing a candidate could be formed from: no accuracy, no grouping, only each stage's wall time.

    python benchmarks/studies/warm_upstream.py --seeds judge3 --cache runs/zoo-cache

The upstream depends on the dataset, ERM and heatmap keys only, not on any candidate's clustering,
grouping or retraining keys, so a later `exmap-ray bench --zoo --seeds judge3 --cache runs/zoo-cache`
reuses it whatever candidate it judges. Logs go to the log file named by --log (default: nowhere on the
console), since ERM's own log lines report val accuracy.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", required=True, help="a seed set of zoo_protocol.yaml (e.g. judge3) or 27,28")
    ap.add_argument("--cache", required=True)
    ap.add_argument("--families", default=None)
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--log", default=None, help="a file for the stages' log lines (default: dropped)")
    a = ap.parse_args(argv)
    from exmap_ray.bench_zoo import choose_families, choose_seeds, protocol
    from exmap_ray.cache import StageCache
    from exmap_ray.cli import ray_session
    from exmap_ray.pipeline import preflight
    from exmap_ray.resources import resolve_resources
    from exmap_ray.spec import SHIPPED, load_spec
    from exmap_ray.stages import run_stages

    logging.basicConfig(filename=a.log or "/dev/null", level=logging.INFO, force=True)
    p = protocol()
    seeds, families = choose_seeds(a.seeds, p, quick=False), choose_families(a.families, p, quick=False)
    cache = StageCache(a.cache)
    with ray_session(None):
        for family in families:
            for seed in seeds:
                spec = resolve_resources(load_spec(SHIPPED / f"{family}.yaml", [*a.set, f"seed={seed}"]))
                data = preflight(spec, check_model=False)
                t0 = time.perf_counter()
                run_stages(spec, data, cache, targets=["features", "heatmaps"])
                print(f"{family} seed {seed}: {time.perf_counter() - t0:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
