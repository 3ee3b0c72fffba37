"""Run one spec over several seeds and print per-seed rows plus mean +- std (the README's figures).

    python benchmarks/studies/seeds.py tune_specs/cmnist.yaml --seeds 0 1 2 --out runs/seeds
    python benchmarks/studies/seeds.py tune_specs/cmnist.yaml --seeds 0 1 2 --set clustering.scope=local

Each seed is a full `exmap-ray run` (its own ERM, heatmaps, clusters, DFR) in OUT/seed<N>.
Nothing here looks at test results to choose anything; it only reports them.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import ray

from exmap_ray.pipeline import preflight, run_pipeline
from exmap_ray.spec import load_spec

ROWS = [("ERM", "erm"), ("ExMap + DFR", "exmap"), ("oracle DFR", "oracle_dfr")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("spec")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--set", dest="sets", action="append", default=[])
    ap.add_argument("--out", type=Path, default=Path("runs/seeds"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    ray.init(logging_level=logging.WARNING)
    per_seed = []
    for seed in args.seeds:
        spec = load_spec(args.spec, args.sets + [f"seed={seed}"])
        res = run_pipeline(spec, args.out / f"seed{seed}", data=preflight(spec))
        per_seed.append(res)
        print(
            json.dumps(
                {
                    "seed": seed,
                    **{k: res[k]["test"]["worst_group_acc"] for _, k in ROWS},
                    "ari": res["robust"]["ari"],
                    "n_groups": res["robust"]["n_groups"],
                    "seconds": sum(res["timings_s"].values()),
                }
            ),
            flush=True,
        )
    ray.shutdown()

    def ms(vals):
        return f"{np.mean(vals):.3f} ± {np.std(vals):.3f}"

    print(f"\n{args.spec} {' '.join(args.sets)} — seeds {args.seeds}\n")
    print("| method | test WGA | mean acc (test samples) | mean acc (train-weighted) |")
    print("|---|---|---|---|")
    for name, key in ROWS:
        t = [r[key]["test"] for r in per_seed]
        print(
            f"| {name} | {ms([x['worst_group_acc'] for x in t])} | {ms([x['mean_acc'] for x in t])} | "
            f"{ms([x['mean_acc_train_weighted'] for x in t])} |"
        )
    e = [r["robust"] for r in per_seed]
    print(
        f"\nExMap pseudo groups vs true val groups: ARI {ms([x['ari'] for x in e])}, "
        f"NMI {ms([x['nmi'] for x in e])}, worst-group recovery {ms([x['worst_recovery'] for x in e])}, "
        f"groups per seed {[x['n_groups'] for x in e]}"
    )


if __name__ == "__main__":
    main()
