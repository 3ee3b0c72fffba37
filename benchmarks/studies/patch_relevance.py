"""Does the ERM model's LRP relevance see the corner patch of cmnist_multi? (A diagnostic for the bench.)

    python benchmarks/studies/patch_relevance.py tune_specs/cmnist_multi.yaml --cache runs/bench-cache [--seed 0]

Reads the cached heatmaps of the spec's ERM model (run `exmap-ray run SPEC --cache DIR` or `bench` first;
nothing is computed here) and prints, per val image group, the share of |relevance| that falls in the
heatmap cell holding the patch and in the mirror corner cell, and the share per colour channel. If the
ERM model ignores the patch, both corners carry about the same share and clustering the heatmaps cannot
find the patch groups, whatever k is.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from exmap_ray.data import build_dataset
from exmap_ray.heatmaps.extract import HeatmapShards
from exmap_ray.resources import resolve_resources
from exmap_ray.spec import load_spec
from exmap_ray.stages import stage_keys
from exmap_ray.cache import StageCache


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("spec")
    ap.add_argument("--cache", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    spec = resolve_resources(load_spec(args.spec, [f"seed={args.seed}"]))  # this machine's device, as the run's
    hm = stage_keys(spec, StageCache(args.cache), ["heatmaps"])["heatmaps"]
    if not hm.done:
        print(
            f"no finished heatmaps for this spec and seed in {args.cache} (looked for {hm.dir}); run "
            f"`exmap-ray run {args.spec} --cache {args.cache} --set seed={args.seed}` first",
            file=sys.stderr,
        )
        return 2
    H = np.abs(HeatmapShards(hm.dir).load().astype(np.float64))  # (N, 3, s, s)
    val = build_dataset(spec.dataset, spec.seed).val
    s = H.shape[-1]
    total = H.sum((1, 2, 3)) + 1e-12
    tl, br = H[:, :, 0, 0].sum(1) / total, H[:, :, s - 1, s - 1].sum(1) / total
    patch = val.attrs["patch"]
    at_patch = np.where(patch == 0, tl, br)
    other = np.where(patch == 0, br, tl)
    chan = H.sum((2, 3)) / total[:, None]
    print(
        f"{spec.name}, seed {spec.seed}: |LRP relevance| of the ERM model on {len(val.y)} val images, "
        f"{s}x{s} cells (a uniform map puts {1 / s**2:.3f} in each cell)"
    )
    print(f"{'':28}{'patch cell':>12}{'mirror cell':>13}{'red ch.':>9}{'green ch.':>10}{'blue ch.':>9}")
    rows = [("all val images", np.ones(len(val.y), bool))]
    rows += [
        ("patch agrees with y", patch == val.y),
        ("patch disagrees with y", patch != val.y),
        ("colour agrees with y", val.attrs["colour"] == val.y),
        ("colour disagrees", val.attrs["colour"] != val.y),
    ]
    for name, m in rows:
        print(
            f"{name:<28}{at_patch[m].mean():>12.4f}{other[m].mean():>13.4f}"
            + "".join(f"{chan[m, c].mean():>9.3f}" for c in range(3))
            + f"   (n={int(m.sum())})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
