"""Where each true val group's members land among a run's pseudo groups.

    python benchmarks/studies/group_shares.py SPEC RUN_DIR [RUN_DIR ...] [--set KEY=VALUE ...]

For each finished `exmap-ray run SPEC --out RUN_DIR` (all made with the same --set options but
seed), reads the run's pseudo groups (`selection.npz`) and seed (`spec.resolved.json`), rebuilds the
val split's true groups (evaluation only) and prints, for the true group with the lowest value of each:
- recovery (`metrics.recovery`, the pipeline's and the bench's): the share of the group's members in
  pseudo groups where it is the majority;
- best share: the largest share of the group's members in any one pseudo group, and how the group's
  members are split over pseudo groups.
Best share alone does not say a group was found (one pseudo group holding everything gives 1.0);
recovery does.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from exmap_ray.data import build_dataset
from exmap_ray.metrics import recovery
from exmap_ray.spec import load_spec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("spec")
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    a = ap.parse_args()
    for run in a.runs:
        seed = json.loads((run / "spec.resolved.json").read_text())["seed"]
        spec = load_spec(a.spec, sets=a.sets + [f"seed={seed}"])
        data = build_dataset(spec.dataset, spec.seed)
        sel = np.load(run / "selection.npz")
        if not np.array_equal(sel["y"], data.val.y):
            raise SystemExit(f"{run}: its val labels are not those of {a.spec} with {a.sets} and seed {seed}")
        pseudo, true = sel["pseudo_groups"], data.val.group
        rec = recovery(pseudo, true)
        shares = {}
        for t in np.unique(true):
            _, counts = np.unique(pseudo[true == t], return_counts=True)
            shares[int(t)] = (counts.max() / counts.sum(), sorted(counts.tolist(), reverse=True))
        w_rec = min(rec, key=rec.get)
        w_share = min(shares, key=lambda t: shares[t][0])
        name = data.group_names
        print(
            f"{run}: seed {seed}; worst recovery {rec[w_rec]:.2f} ({name[w_rec]}, "
            f"{int((true == w_rec).sum())} val, split {shares[w_rec][1][:6]}); worst best share "
            f"{shares[w_share][0]:.2f} ({name[w_share]}, {int((true == w_share).sum())} val, split "
            f"{shares[w_share][1][:6]})"
        )


if __name__ == "__main__":
    main()
