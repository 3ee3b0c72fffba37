"""LRP throughput against input x gradient (the forward+backward-to-input bound) on the CPU.

    nice -n 10 .venv/bin/python benchmarks/lrp_speed.py                 # small VGG-style CNN, 32 px, batch 128
    nice -n 10 .venv/bin/python benchmarks/lrp_speed.py --threads 2 --repeats 5 --precision bf16

Each method runs `--repeats` timed batches after one warm-up, interleaved round-robin so that a
load change on a shared machine hits every method alike; the median batch time is reported.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from exmap_ray.heatmaps import HEATMAP_METHODS
from exmap_ray.spec import HeatmapSpec


def small_vgg(n_classes: int = 10) -> nn.Module:
    def block(i, o):
        return [nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU()]

    return nn.Sequential(
        *block(3, 32),
        *block(32, 32),
        nn.MaxPool2d(2),
        *block(32, 64),
        *block(64, 64),
        nn.MaxPool2d(2),
        *block(64, 128),
        nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(128, n_classes),
    ).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = small_vgg()
    x = torch.randn(args.batch, 3, args.size, args.size)
    methods = {
        "input_x_gradient": HEATMAP_METHODS.get("input_x_gradient")(model, HeatmapSpec(precision=args.precision)),
        "lrp alpha2beta1": HEATMAP_METHODS.get("lrp")(model, HeatmapSpec(precision=args.precision)),
        "lrp gamma": HEATMAP_METHODS.get("lrp")(model, HeatmapSpec(conv_rule="gamma", precision=args.precision)),
    }
    times: dict[str, list[float]] = {k: [] for k in methods}
    for rep in range(args.repeats + 1):
        for name, fn in methods.items():
            t0 = time.perf_counter()
            fn(x)
            if rep:  # the first round is the warm-up
                times[name].append(time.perf_counter() - t0)
    base = args.batch / statistics.median(times["input_x_gradient"])
    print(f"{args.size} px, batch {args.batch}, {args.threads} thread(s), {args.precision}, median of {args.repeats}")
    print(f"{'heatmap':<20} {'img/s':>8} {'vs input x gradient':>20}")
    for name, ts in times.items():
        ips = args.batch / statistics.median(ts)
        print(f"{name:<20} {ips:>8.0f} {ips / base:>19.0%}")


if __name__ == "__main__":
    main()
