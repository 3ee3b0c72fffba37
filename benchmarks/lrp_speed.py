"""Every heatmap method against its bound: a bare forward + backward to the input of the same model.

    nice -n 10 .venv/bin/python benchmarks/lrp_speed.py                       # the three models below, fp32
    nice -n 10 .venv/bin/python benchmarks/lrp_speed.py --models small_cnn --repeats 5 --precision bf16

The bound ("bare") is what a reviewer would write for input x gradient: `torch.autograd.grad` of the
selected (predicted) logit with respect to the input, times the input, on the model as given (eval mode,
parameters frozen). Every method of the registry (`heatmaps.method`) and the LRP gamma rule run on the
same batch, interleaved round-robin batch by batch, so that a load change on a shared machine hits every
pass alike; the median batch time is reported, with each method's share of the bare pass's img/s
(issue 31's goal: LRP >= 45% on the small CNN and on resnet10t).

Models: a small VGG-style CNN at 32 px (the one earlier figures used), timm's resnet10t at 28 px (the
C-MNIST backbone) and resnet18 at 64 px; untrained (speed does not depend on the weights), 10 classes.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch
from torch import nn

from exmap_ray.heatmaps import HEATMAP_METHODS
from exmap_ray.spec import HeatmapSpec

MODELS = {"small_cnn": 32, "resnet10t": 28, "resnet18": 64}  # model -> image size


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


def build(name: str) -> nn.Module:
    if name == "small_cnn":
        return small_vgg()
    import timm

    return timm.create_model(name, pretrained=False, num_classes=10).eval()


def bare_pass(model: nn.Module):
    """Input x gradient of the predicted logit, nothing else: the bound every method is compared with.
    On a frozen copy (no weight gradients); the methods get the model itself, as the pipeline gives it."""
    model = copy.deepcopy(model).requires_grad_(False)

    def run(x):
        x = x.detach().requires_grad_(True)
        logits = model(x)
        sel = logits.gather(1, logits.argmax(1, keepdim=True)).sum()
        (g,) = torch.autograd.grad(sel, x)
        return g * x

    return run


def methods_of(model: nn.Module, precision: str, ig_steps: int, x: torch.Tensor) -> tuple[dict, list[str]]:
    """The passes to time, and the methods that do not apply to this model (Grad-CAM needs a timm model)."""
    out, skipped = {"bare forward+backward": bare_pass(model)}, []
    specs = {f"{n} (alpha2beta1)" if n == "lrp" else n: (n, {}) for n in HEATMAP_METHODS.names()}
    specs["lrp (gamma)"] = ("lrp", {"conv_rule": "gamma"})
    for label, (name, keys) in specs.items():
        try:
            fn = HEATMAP_METHODS.get(name)(
                model, HeatmapSpec(method=name, precision=precision, ig_steps=ig_steps, **keys)
            )
            fn(x[:2])
        except Exception as e:  # noqa: BLE001 - reported as not applicable
            skipped.append(f"{label}: {type(e).__name__}")
            continue
        out[label] = fn
    return out, skipped


def time_methods(methods: dict, x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median seconds per batch of each method, round-robin after one warm-up round."""
    times: dict[str, list[float]] = {k: [] for k in methods}
    for rep in range(repeats + 1):
        for name, fn in methods.items():
            t0 = time.perf_counter()
            fn(x)
            if rep:
                times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--ig-steps", type=int, default=8, help="integrated gradients' steps (its cost scales with it)")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    print(
        f"batch {args.batch}, {args.threads} thread(s), {args.precision}, median of {args.repeats} batches, "
        f"torch {torch.__version__}, load average at start {load:.1f}\n"
    )
    print("| model | px | pass | img/s | share of the bare pass |")
    print("|---|---|---|---|---|")
    for name in args.models.split(","):
        size = MODELS[name]
        torch.manual_seed(0)
        model = build(name)
        x = torch.randn(args.batch, 3, size, size)
        methods, skipped = methods_of(model, args.precision, args.ig_steps, x)
        med = time_methods(methods, x, args.repeats)
        bound = args.batch / med["bare forward+backward"]
        for method, s in med.items():
            ips = args.batch / s
            print(f"| {name} | {size} | {method} | {ips:,.0f} | {ips / bound:.0%} |", flush=True)
        for what in skipped:
            print(f"| {name} | {size} | {what} (does not apply) | | |")
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
