"""LRP before and after a change, in one run: the same batch through an older lrp.py (from git) and today's.

    python benchmarks/studies/lrp_before_after.py 5adb18d small_cnn,resnet10t 7

Prints the largest relative difference of the maps (0.0: the same maps) and each pass's img/s with its
share of a bare forward+backward to the input (benchmarks/lrp_speed.py), the passes interleaved
round-robin, median of REPEATS batches. Results: benchmarks/results/bounds/lrp_ab.txt.
"""

import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lrp_speed import MODELS, bare_pass, build, time_methods  # noqa: E402

import exmap_ray.heatmaps.lrp as new  # noqa: E402
from exmap_ray.spec import HeatmapSpec  # noqa: E402


def older(rev: str):
    """lrp.py as it was at `rev`, loaded beside today's (its registration line dropped)."""
    src = subprocess.check_output(["git", "show", f"{rev}:exmap_ray/heatmaps/lrp.py"], text=True)
    src = src.replace('@HEATMAP_METHODS.register("lrp", keys=LrpKeys)', "")
    mod = type(sys)("exmap_ray.heatmaps.lrp_before")
    mod.__package__ = "exmap_ray.heatmaps"
    sys.modules[mod.__name__] = mod
    exec(compile(src, f"lrp.py@{rev}", "exec"), mod.__dict__)
    return mod


def main() -> None:
    rev, models, repeats = sys.argv[1], sys.argv[2].split(","), int(sys.argv[3])
    torch.set_num_threads(2)
    old = older(rev)
    for name in models:
        m = build(name)
        x = torch.randn(128, 3, MODELS[name], MODELS[name])
        fns = {"bare": bare_pass(m)}
        for rule in ("alpha_beta", "gamma"):
            fns[f"old {rule}"] = old.LRP(m, HeatmapSpec(conv_rule=rule))
            fns[f"new {rule}"] = new.LRP(m, HeatmapSpec(conv_rule=rule))
            a, b = fns[f"old {rule}"](x)[0], fns[f"new {rule}"](x)[0]
            print(name, rule, "max rel diff", float((a - b).abs().max() / a.abs().max()))
        med = time_methods(fns, x, repeats)  # round-robin, median of `repeats` batches
        for k, v in med.items():
            print(f"{name} {k:16s} {128 / v:7.0f} img/s {med['bare'] / v:5.0%}")


if __name__ == "__main__":
    main()
