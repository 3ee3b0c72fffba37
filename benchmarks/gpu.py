"""Throughput of heatmaps, ERM and k-means as ratios to bounds measured in the same run.

    .venv/bin/python benchmarks/gpu.py                 # a GPU: ResNet-50 at 224 px, bf16 (< 8 min)
    nice -n 10 .venv/bin/python benchmarks/gpu.py --cpu   # this CPU: a small VGG-style CNN at 32 px, fp32

Every GPU section runs with the flags a pipeline stage gets (`resources.configure_cuda`: cuDNN autotuning,
TF32 off unless the precision is tf32) and prints them first; the batch, size, precision and layout are
spec settings (`--set`), printed with each section.

Sections, each a measured figure against a bound taken on the same model, batch and precision:
- heatmaps: LRP (alpha2beta1, gamma) and the gradient methods against one forward plus a backward
  pass to the input (no rules, no weight gradients): what any gradient heatmap costs at least. Then
  what a heatmap actor runs per shard (`heatmaps.extract.extract_batches`: its DataLoader with pinned
  batches, the copy to the GPU, the method, the downsizing and the copy back) against the method alone.
  Also LRP under bf16 autocast against fp32 maps (per-image cosine, relevance totals);
- features: the penultimate features and logits every method keeps from its forward (the heatmaps
  stage stores them for val) under bf16 autocast, against a plain fp32 forward (`models.embed`);
- ERM: images/s of an epoch inside Ray Train (`exmap_ray.erm.train_erm`, epochs after the first)
  against a bare training-step loop of the same model, batch, optimizer and precision on batches
  already in memory; Ray Train's fixed start-up (wall time minus the epochs) is reported apart;
- k-means: `exmap_ray.clustering.kmeans` as the clusters stage runs it (on a GPU: its GPU route on
  that device, FAISS's GPU build where installed, else torch's k-means) against memory bandwidth:
  every Lloyd iteration reads all points once, so niter * N * d * 4 bytes at the copy bandwidth
  measured here (plus one host-to-device copy of the points on a GPU).
Figures are printed, never asserted. Every timed figure is the median of --repeats rounds.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.lrp_speed import small_vgg  # noqa: E402

# the pipeline's defaults on a GPU: precision auto = bf16, channels_last off (erm.channels_last); --set
GPU = {
    "model": "resnet50",
    "size": 224,
    "batch": 128,
    "precision": "bf16",
    "channels_last": False,
    "erm_backbone": "resnet50",
    "erm_images": 4096,
    "erm_epochs": 3,
    "kmeans_n": 1_000_000,
    "kmeans_d": 784,
}
CPU = {
    "model": "small_vgg",
    "size": 32,
    "batch": 128,
    "precision": "fp32",
    "channels_last": False,
    "erm_backbone": "resnet10t",
    "erm_images": 2048,
    "erm_epochs": 3,
    "kmeans_n": 200_000,
    "kmeans_d": 147,
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats: int) -> float:
    """Median seconds of fn() over `repeats` calls after one warm-up call."""
    fn()
    sync(device)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def timed_together(fns: dict, device, repeats: int) -> dict:
    """Median seconds of each fn, the fns called round-robin (after one warm-up round), so that a load
    change on a shared machine hits all of them alike."""
    ts: dict = {k: [] for k in fns}
    for rep in range(repeats + 1):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            if rep:
                ts[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in ts.items()}


def build_model(name: str, n_classes: int, device, channels_last: bool):
    import timm

    torch.manual_seed(0)
    m = small_vgg(n_classes) if name == "small_vgg" else timm.create_model(name, num_classes=n_classes)
    m = m.eval().to(device)
    return m.to(memory_format=torch.channels_last) if channels_last else m


# ----------------------------------------------------------------------------- heatmaps


def bench_heatmaps(cfg, device, repeats: int) -> None:
    from exmap_ray.heatmaps import HEATMAP_METHODS
    from exmap_ray.models import autocast
    from exmap_ray.spec import HeatmapSpec

    model = build_model(cfg["model"], 10, device, cfg["channels_last"])
    x = torch.randn(cfg["batch"], 3, cfg["size"], cfg["size"], device=device)
    if cfg["channels_last"]:
        x = x.contiguous(memory_format=torch.channels_last)
    bare = build_model(cfg["model"], 10, device, cfg["channels_last"]).requires_grad_(False)

    def bound():  # forward + backward to the input: the floor of every gradient heatmap
        xi = x.detach().requires_grad_(True)
        with autocast(device.type, cfg["precision"]):
            logits = bare(xi)
        torch.autograd.grad(logits.gather(1, logits.argmax(1, keepdim=True)).sum(), xi)

    fns = {"forward+backward to input (bound)": bound}
    rows = [
        ("input_x_gradient", "input_x_gradient", {}),
        ("gradcam", "gradcam", {}),
        ("lrp alpha2beta1", "lrp", {}),
        ("lrp gamma", "lrp", {"conv_rule": "gamma"}),
    ]
    for label, name, keys in rows:
        if name == "gradcam" and not hasattr(model, "forward_features"):
            continue  # Grad-CAM needs timm's forward_features / forward_head split
        method = HEATMAP_METHODS.get(name)(model, HeatmapSpec(precision=cfg["precision"], **keys))
        fns[label] = (lambda m: lambda: m(x))(method)
    t = timed_together(fns, device, repeats)
    t_bound = t["forward+backward to input (bound)"]
    print(
        f"\nheatmaps: {cfg['model']} at {cfg['size']} px, batch {cfg['batch']}, {cfg['precision']}"
        f"{', channels_last' if cfg['channels_last'] else ''}"
    )
    print(f"  {'pass':<34} {'img/s':>8} {'of the bound':>13} {'of input x gradient':>20}")
    for label, sec in t.items():
        print(f"  {label:<34} {cfg['batch'] / sec:>8.0f} {t_bound / sec:>13.0%} {t['input_x_gradient'] / sec:>20.0%}")
    actor_path(cfg, device, model, t["lrp alpha2beta1"], repeats)
    lrp_bf16_agreement(device)


def actor_path(cfg, device, model, t_method: float, repeats: int) -> None:
    """What a heatmap actor runs per shard (extract_batches over its DataLoader: host batches, pinned on a
    GPU, copied non_blocking; LRP; downsizing to 7 px; the maps, features and logits back to the host),
    in img/s against LRP alone on a batch already on the device (t_method, from the table above)."""
    from torch.utils.data import DataLoader

    from exmap_ray.data.base import TensorImages
    from exmap_ray.heatmaps import HEATMAP_METHODS
    from exmap_ray.heatmaps.extract import ShardBatches, extract_batches
    from exmap_ray.heatmaps.method import is_timm, with_features
    from exmap_ray.spec import HeatmapSpec

    if not is_timm(model):  # the actors keep the penultimate features, which only a timm model splits off
        print(f"  heatmap actor's shard path: skipped ({cfg['model']} is not a timm model)")
        return
    n = 4 * cfg["batch"]
    g = torch.Generator().manual_seed(3)
    images = TensorImages(torch.randn(n, 3, cfg["size"], cfg["size"], generator=g))
    sampler = ShardBatches(cfg["batch"])
    sampler.start, sampler.stop = 0, n
    loader = DataLoader(images, batch_sampler=sampler, pin_memory=device.type == "cuda")
    method = with_features(
        HEATMAP_METHODS.get("lrp")(model, HeatmapSpec(precision=cfg["precision"])), model, cfg["precision"]
    )
    sec = timed(lambda: extract_batches(method, loader, 7, str(device)), device, max(1, repeats // 2))
    alone = cfg["batch"] / t_method
    print(
        f"  heatmap actor's shard path (extract_batches, {n} images, pinned={device.type == 'cuda'}): "
        f"{n / sec:.0f} img/s, {n / sec / alone:.0%} of LRP alone ({alone:.0f} img/s)"
    )


def lrp_bf16_agreement(device) -> None:
    """LRP maps under bf16 autocast against fp32 maps, on small nets with non-trivial BatchNorm."""
    import timm

    from exmap_ray.heatmaps.lrp import LRP
    from exmap_ray.spec import HeatmapSpec

    print("  LRP bf16 autocast vs fp32 (divisions and relevance in fp32), 16 signed 64 px images:")
    for backbone in ("test_resnet", "resnet10t", "resnet18"):
        torch.manual_seed(0)
        m = timm.create_model(backbone, num_classes=2).eval()
        for bn in m.modules():
            if isinstance(bn, torch.nn.BatchNorm2d):
                bn.running_mean.uniform_(-0.2, 0.2)
                bn.running_var.uniform_(0.5, 2.0)
                bn.weight.data.uniform_(0.5, 1.5)  # timm zero-initialises the last BN of each block
        m = m.to(device)
        x = torch.randn(16, 3, 64, 64, generator=torch.Generator().manual_seed(1)).to(device)
        for rule in ("alpha_beta", "gamma"):
            full, p32 = LRP(m, HeatmapSpec(conv_rule=rule, precision="fp32"))(x)
            half, p16 = LRP(m, HeatmapSpec(conv_rule=rule, precision="bf16"))(x)
            same = p32 == p16
            cos = F.cosine_similarity(half.flatten(1), full.flatten(1), dim=1)[same]
            tot32, tot16 = full.flatten(1).sum(1)[same], half.flatten(1).sum(1)[same]
            print(
                f"    {backbone:<12} {rule:<10} cosine min {cos.min():.4f} mean {cos.mean():.4f}; "
                f"relevance total fp32 {tot32.mean():.4f}, bf16 {tot16.mean():.4f} "
                f"(max |diff| {(tot16 - tot32).abs().max():.4f}); same prediction {int(same.sum())}/16"
            )


def features_bf16_agreement(cfg, device, repeats: int) -> None:
    """The features and logits each method's forward gives (what the heatmaps stage keeps for val) under
    bf16 autocast and fp32, against a plain fp32 forward: max |difference| over the largest |value|,
    and the per-image cosine. Not timed (`repeats` unused)."""
    import timm

    from exmap_ray.heatmaps import HEATMAP_METHODS
    from exmap_ray.models import embed
    from exmap_ray.spec import HeatmapSpec

    print(
        "\nfeatures kept from each method's forward vs a plain fp32 forward (models.embed), 16 signed 64 px "
        "images; 'max err' = max |diff| / max |value|:"
    )
    for backbone in ("test_resnet", "resnet10t", "resnet18"):
        torch.manual_seed(0)
        m = timm.create_model(backbone, num_classes=2).eval()
        for bn in m.modules():
            if isinstance(bn, torch.nn.BatchNorm2d):  # non-trivial statistics: LRP's folding matters
                bn.running_mean.uniform_(-0.2, 0.2)
                bn.running_var.uniform_(0.5, 2.0)
                bn.weight.data.uniform_(0.5, 1.5)
        m = m.to(device)
        x = torch.randn(16, 3, 64, 64, generator=torch.Generator().manual_seed(1)).to(device)
        f_ref, l_ref = (torch.from_numpy(a).to(device) for a in embed(m, x, device=str(device), precision="fp32"))
        for name in HEATMAP_METHODS.names():
            for precision in ("fp32", "bf16"):
                e = HEATMAP_METHODS.get(name)(m, HeatmapSpec(precision=precision, ig_steps=4)).explain(x)
                f_err = ((e.features - f_ref).abs().max() / f_ref.abs().max()).item()
                l_err = ((e.logits - l_ref).abs().max() / l_ref.abs().max()).item()
                cos = F.cosine_similarity(e.features, f_ref, dim=1).min().item()
                print(
                    f"  {backbone:<12} {name:<21} {precision:<5} features max err {f_err:.1e}, cosine min "
                    f"{cos:.5f}; logits max err {l_err:.1e}"
                )


# ----------------------------------------------------------------------------- ERM


def bench_erm(cfg, device, repeats: int) -> None:
    import ray

    from exmap_ray.erm import make_optimizer, train_erm
    from exmap_ray.models import autocast, create_model
    from exmap_ray.spec import from_dict

    size = cfg["size"] if device.type == "cuda" else None  # cmnist's own 28 px on the CPU
    spec = from_dict(
        {
            "dataset": {
                "name": "cmnist",
                "n_train": cfg["erm_images"],
                "n_val": 512,
                "n_test": 256,
                "image_size": size,
            },
            "model": {"backbone": cfg["erm_backbone"]},
            "erm": {
                "epochs": cfg["erm_epochs"],
                "batch_size": cfg["batch"],
                "precision": cfg["precision"],
                "channels_last": cfg["channels_last"],
            },
            "resources": {"gpu": device.type == "cuda"},
        }
    )
    e = spec.erm
    threads = torch.get_num_threads()
    model = create_model(spec.model.backbone, 2).to(device).train()
    if cfg["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    opt = make_optimizer(model.parameters(), e)
    side = size or 28
    x = torch.randn(cfg["batch"], 3, side, side, device=device)
    if cfg["channels_last"]:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (cfg["batch"],), device=device)

    def step():
        with autocast(device.type, cfg["precision"]):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    t_step = timed(lambda: [step() for _ in range(5)], device, repeats) / 5
    bare = cfg["batch"] / t_step

    from exmap_ray.cli import local_ray_defaults

    local_ray_defaults()
    ray.init(num_cpus=None if device.type == "cuda" else threads, logging_level=logging.WARNING)
    try:
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            info = train_erm(spec, Path(d), 2)
            wall = time.perf_counter() - t0
    finally:
        ray.shutdown()
    hist = info["history"]
    epoch_s = [cfg["erm_images"] / h["images_per_s"] for h in hist]
    later = statistics.median(h["images_per_s"] for h in hist[1:]) if len(hist) > 1 else hist[0]["images_per_s"]
    print(
        f"\nERM: {cfg['erm_backbone']} at {side} px, batch {cfg['batch']}, {cfg['precision']}"
        f"{', channels_last' if cfg['channels_last'] else ''}, {cfg['erm_images']} images x {len(hist)} epochs"
    )
    print(f"  bare training step (batches in memory)    {bare:>8.0f} img/s  100%")
    print(f"  Ray Train epoch (median after the first)  {later:>8.0f} img/s  {later / bare:>4.0%}")
    print(
        f"  Ray Train fixed start-up: {wall - sum(epoch_s):.1f} s of a {wall:.1f} s fit "
        f"(epochs {', '.join(f'{t:.1f}' for t in epoch_s)} s, validation and checkpoints included in the rest)"
    )


# ----------------------------------------------------------------------------- k-means


def bench_kmeans(cfg, device, repeats: int) -> None:
    from exmap_ray.clustering import kmeans
    from exmap_ray.clustering.device import clustering_device, faiss_gpu

    n, d, k, niter = cfg["kmeans_n"], cfg["kmeans_d"], 8, 25
    rng = np.random.default_rng(0)
    X = rng.normal(0, 4, (k, d)).astype(np.float32)[rng.integers(0, k, n)] + rng.standard_normal(
        (n, d), dtype=np.float32
    )
    nbytes = X.nbytes
    if device.type == "cuda":
        big = torch.empty(nbytes // 4, device=device)
        t_copy = timed(lambda: big.clone(), device, repeats)
        bw = 2 * nbytes / t_copy  # a copy reads and writes
        host = torch.from_numpy(X).pin_memory()
        t_h2d = timed(lambda: host.to(device, non_blocking=True), device, repeats)
        bound = niter * nbytes / bw + t_h2d
        where = f"device copy {bw / 1e9:.0f} GB/s, host-to-device {nbytes / t_h2d / 1e9:.0f} GB/s"
        del big, host
    else:
        buf = np.empty_like(X)
        t_copy = timed(lambda: np.copyto(buf, X), device, repeats)
        bw = 2 * nbytes / t_copy
        bound = niter * nbytes / bw
        where = f"memory copy {bw / 1e9:.1f} GB/s"
        del buf
    # as clusters_task runs it: the GPU route on the stage's device (resources.gpu true), else the CPU route
    with clustering_device(str(device) if device.type == "cuda" else None):
        route = ("FAISS GPU" if faiss_gpu() else "torch") if device.type == "cuda" else "CPU"
        t = timed(lambda: kmeans(X, k, niter=niter, nredo=1, seed=0), torch.device("cpu"), max(1, repeats // 2))
    print(f"\nk-means ({route} route): {n:,} x {d} fp32, k={k}, {niter} iterations, 1 restart ({where})")
    print(f"  bandwidth bound {bound:.2f} s; exmap_ray.clustering.kmeans {t:.2f} s: {bound / t:.0%} of the bound")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="the CPU settings (also the default without CUDA)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (--cpu)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--only",
        nargs="*",
        choices=["heatmaps", "features", "erm", "kmeans"],
        default=["heatmaps", "features", "erm", "kmeans"],
    )
    ap.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="override a setting, e.g. --set kmeans_n=100000 erm_images=1024 batch=64",
    )
    args = ap.parse_args()
    on_gpu = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if on_gpu else "cpu")
    cfg = dict(GPU if on_gpu else CPU)
    for kv in args.set:
        key, value = kv.split("=", 1)
        cfg[key] = type(cfg[key])(value) if not isinstance(cfg[key], bool) else value.lower() == "true"
    if on_gpu:
        from exmap_ray.resources import configure_cuda, driver_version

        configure_cuda("cuda:0", cfg["precision"])  # the flags every pipeline stage on a GPU runs with
        print(
            f"device: {torch.cuda.get_device_name()}; torch {torch.__version__} "
            f"(CUDA {torch.version.cuda}), driver {driver_version()}"
        )
    else:
        torch.set_num_threads(args.threads)
        print(f"device: CPU, {args.threads} thread(s); torch {torch.__version__}")
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    print(
        f"flags: cudnn.benchmark={torch.backends.cudnn.benchmark}, cudnn.allow_tf32={tf32[0]}, "
        f"cuda.matmul.allow_tf32={tf32[1]}; settings: {', '.join(f'{k}={v}' for k, v in cfg.items())}"
    )
    t0 = time.perf_counter()
    for section in args.only:
        {"heatmaps": bench_heatmaps, "features": features_bf16_agreement, "erm": bench_erm, "kmeans": bench_kmeans}[
            section
        ](cfg, device, args.repeats)
    print(f"\n(total {time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
