"""The ERM stage against a bare PyTorch loop doing the same work, in one run.

    nice -n 10 .venv/bin/python benchmarks/erm_bound.py                 # the demo's ERM: C-MNIST, resnet10t
    nice -n 10 .venv/bin/python benchmarks/erm_bound.py --set erm.epochs=2 --set dataset.n_train=2000

Same spec as `exmap-ray run cmnist` (override with --set): the same data (built by the dataset's own
code), model, batch size, optimizer, learning-rate schedule, epochs and a val pass each epoch, on the
same number of threads. Three timings:

- **bare loop**: a plain loop in this process, batches cut from the in-memory tensors by a shuffled index;
- **bare loop, DataLoader**: the same through torch's DataLoader over the stage's own `Labeled` dataset
  (what the stage iterates);
- **ERM stage**: `erm.train_erm` on a local Ray started beforehand (Ray's start is shown apart), split with
  the per-epoch times the workers report: Ray Train's start-up (fit() to the first epoch's start: actors,
  process group, imports, data and model built in the worker), training, validation, and the rest
  (checkpoints each epoch, reports, the end of the fit and the model saved).

Throughput per epoch is the training pass alone (images / train seconds), for the stage and the bare loop.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def bare_loop(spec, data, threads: int, via_loader: bool) -> dict:
    """What ERM computes, with nothing around it: returns the wall time and per-epoch train seconds."""
    from torch.utils.data import DataLoader

    from exmap_ray.data.base import Labeled
    from exmap_ray.erm import accuracy, epoch_lr, make_optimizer
    from exmap_ray.hashing import stage_seed
    from exmap_ray.models import create_model

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    torch.manual_seed(stage_seed(spec.seed, "erm"))
    e = spec.erm
    model = create_model(spec.model.backbone, data.n_classes, spec.model.pretrained)
    opt = make_optimizer(model.parameters(), e)
    X, Y = data.train.images.x, torch.as_tensor(data.train.y)  # in-memory datasets: TensorImages
    Xv, Yv = data.val.images.x, torch.as_tensor(data.val.y)
    g = torch.Generator().manual_seed(stage_seed(spec.seed, "erm-shuffle"))
    if via_loader:
        train = DataLoader(Labeled(data.train), batch_size=e.batch_size, shuffle=True, generator=g)
        val = DataLoader(Labeled(data.val), batch_size=512)
    epochs = []
    for epoch in range(e.epochs):
        for group in opt.param_groups:
            group["lr"] = epoch_lr(e, epoch)
        model.train()
        te = time.perf_counter()
        if via_loader:
            batches = train
        else:
            order = torch.randperm(len(Y), generator=g)
            batches = ((X[i], Y[i]) for i in order.split(e.batch_size))
        for x, y in batches:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        epochs.append(time.perf_counter() - te)
        if via_loader:
            accuracy(model, val, "cpu")
        else:
            model.eval()
            with torch.no_grad():
                _ = sum(int((model(x).argmax(1) == y).sum()) for x, y in zip(Xv.split(512), Yv.split(512)))
    return {"wall": time.perf_counter() - t0, "train_s": epochs}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("spec", nargs="?", default="cmnist", help="a shipped spec name or a YAML path (default cmnist)")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="key.path=value (repeatable)")
    args = ap.parse_args()
    import logging

    import ray

    from exmap_ray import plugins  # noqa: F401 - registers the datasets
    from exmap_ray.cli import local_ray_defaults
    from exmap_ray.data import build_dataset
    from exmap_ray.erm import train_erm
    from exmap_ray.resources import cpus_per_worker, resolve_resources
    from exmap_ray.spec import SHIPPED, load_spec

    path = args.spec if args.spec.endswith((".yaml", ".yml")) else SHIPPED / f"{args.spec}.yaml"
    spec = resolve_resources(load_spec(Path(path), args.sets))
    e, d = spec.erm, spec.dataset
    local_ray_defaults()
    t = time.perf_counter()
    ray.init(logging_level=logging.WARNING)  # started first, so the bare loops run beside an idle Ray as the stage
    ray_start = time.perf_counter() - t
    threads = cpus_per_worker(e.num_workers, spec)
    data = build_dataset(d, spec.seed)
    n = len(data.train.y)
    print(
        f"{spec.name}: {spec.model.backbone}, {e.epochs} epochs over {n} train images, val pass over "
        f"{len(data.val.y)} each epoch, batch {e.batch_size}, {e.optimizer}, {threads} thread(s), "
        f"{e.num_workers} Ray Train worker(s); load average at start {os.getloadavg()[0]:.1f}\n"
    )
    rows = {}
    for name, loader in (("bare loop", False), ("bare loop, DataLoader", True)):
        rows[name] = bare_loop(spec, data, threads, loader)
    with tempfile.TemporaryDirectory() as out:
        t = time.perf_counter()
        res = train_erm(spec, Path(out), data.n_classes)
        wall = time.perf_counter() - t
    ray.shutdown()
    h = res["history"]
    train_s, val_s = [m["train_s"] for m in h], [m["val_s"] for m in h]
    startup = h[0]["since_fit_s"] - train_s[0] - val_s[0]
    rest = wall - startup - sum(train_s) - sum(val_s)
    bare = rows["bare loop"]
    print("| run | wall (s) | x bare loop | median img/s per epoch | share of the bare loop's img/s |")
    print("|---|---|---|---|---|")
    bare_ips = n / statistics.median(bare["train_s"])
    for name, r in rows.items():
        ips = n / statistics.median(r["train_s"])
        print(f"| {name} | {r['wall']:.1f} | {r['wall'] / bare['wall']:.2f} | {ips:,.0f} | {ips / bare_ips:.0%} |")
    ips = n / statistics.median(train_s)
    print(f"| ERM stage (Ray Train) | {wall:.1f} | {wall / bare['wall']:.2f} | {ips:,.0f} | {ips / bare_ips:.0%} |")
    print(
        f"\nERM stage split: Ray Train start-up {startup:.1f} s (fit() to the first epoch's start), training "
        f"{sum(train_s):.1f} s, validation {sum(val_s):.1f} s, the rest {rest:.1f} s (checkpoints, reports, "
        f"end of fit, model saved); Ray's own start before it {ray_start:.1f} s"
    )
    print("per-epoch img/s, stage: " + ", ".join(f"{n / s:,.0f}" for s in train_s))
    print("per-epoch img/s, bare:  " + ", ".join(f"{n / s:,.0f}" for s in bare["train_s"]))
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
