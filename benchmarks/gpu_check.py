"""The parts of the GPU check that need no Ray, one per call, each writing OUT/<part>.json and a figure.

    python benchmarks/gpu_check.py PART [--out DIR] [--tiny]     # PART: see PARTS; gpu_check.sh runs them all
    python benchmarks/gpu_check.py summary --out DIR              # OUT/summary.md of the finished parts

- methods: every registered heatmap method on the GPU against the same method on the CPU (fp32 with
  TF32 off: max relative error per image; bf16 autocast: per-image cosine), on a timm test_resnet
  with non-trivial BatchNorm statistics; figure: the GPU maps of 4 images;
- lrp_speed: ResNet-50 at 224 px: the heatmap methods against a bare forward plus backward pass to the
  input of the plain model (no rules, no weight gradients), round-robin medians, bf16 autocast and
  channels_last as the pipeline's GPU defaults, and LRP in fp32 (TF32) beside them;
- kmeans: exmap_ray.clustering.kmeans (FAISS; on the CPU where only faiss-cpu is installed) against a
  bare Lloyd loop in torch on the GPU with the same k-means++ start and iterations, and a memory
  bandwidth bound (each iteration reads every point once); agreement of the two partitions (ARI);
- bf16: LRP under bf16 autocast against fp32 (per-image cosine, relative L2 error, relevance totals)
  and the features its forward keeps against a plain fp32 forward, on resnet18 and resnet50;
- erm_step: a bare training step (batch in device memory) against the project's ERM loop
  (erm.train_epoch over a DataLoader of host tensors, as the Ray Train worker runs it).
Every measurement prints and records the flags it ran with: precision, TF32 (matmul, cuDNN),
channels_last, batch, cudnn.benchmark. `--tiny` (and any run without CUDA) uses small models and
sizes on the CPU, to show every step runs; those figures are not GPU figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.gpu import build_model, sync, timed_together  # noqa: E402

GPU = {
    "speed_model": "resnet50",
    "size": 224,
    "batch": 64,
    "repeats": 5,
    "bf16_models": ["resnet18", "resnet50"],
    "bf16_size": 128,
    "bf16_n": 32,
    "kmeans_n": 1_000_000,
    "kmeans_d": 256,
    "kmeans_k": 8,
    "erm_model": "resnet50",
    "erm_batch": 128,
    "erm_steps": 20,
}
TINY = {
    "speed_model": "test_resnet",
    "size": 32,
    "batch": 4,
    "repeats": 2,
    "bf16_models": ["test_resnet"],
    "bf16_size": 32,
    "bf16_n": 4,
    "kmeans_n": 20_000,
    "kmeans_d": 16,
    "kmeans_k": 4,
    "erm_model": "test_resnet",
    "erm_batch": 8,
    "erm_steps": 3,
}
PARTS = ["methods", "lrp_speed", "kmeans", "bf16", "erm_step"]


def flags(device, precision: str, channels_last: bool, batch: int) -> dict:
    """What a measurement ran with, recorded beside its figures."""
    f = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "precision": precision,
        "channels_last": channels_last,
        "batch": batch,
        "cudnn.benchmark": torch.backends.cudnn.benchmark,
        "tf32.matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32.cudnn": torch.backends.cudnn.allow_tf32,
        "torch": torch.__version__,
    }
    if device.type == "cpu":
        f["threads"] = torch.get_num_threads()
    return f


def show(f: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in f.items())


def save(out: Path, part: str, record: dict, fig=None) -> None:
    tmp = out / f".{part}.json.tmp"
    tmp.write_text(json.dumps(record, indent=1, default=float))
    os.replace(tmp, out / f"{part}.json")
    if fig is not None:
        fig.savefig(out / f"{part}.png", dpi=110, bbox_inches="tight")
        print(f"  figure: {out / f'{part}.png'}")


def plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    return pyplot


def bn_resnet(name: str, n_classes: int, seed: int = 0):
    """A timm model whose BatchNorm layers have non-trivial statistics (folding and rules matter)."""
    import timm

    torch.manual_seed(seed)
    m = timm.create_model(name, num_classes=n_classes).eval()
    g = torch.Generator().manual_seed(seed + 1)
    for bn in m.modules():
        if isinstance(bn, torch.nn.BatchNorm2d):
            bn.running_mean.copy_(torch.rand(bn.num_features, generator=g) * 0.4 - 0.2)
            bn.running_var.copy_(torch.rand(bn.num_features, generator=g) * 1.5 + 0.5)
            bn.weight.data.copy_(torch.rand(bn.num_features, generator=g) + 0.5)  # timm zero-inits some
    return m


def method_list():
    from exmap_ray.heatmaps import HEATMAP_METHODS

    return [(n, {}) for n in HEATMAP_METHODS.names()] + [("lrp", {"conv_rule": "gamma", "gamma": 4.0})]


# ----------------------------------------------------------------------------- parts


def part_methods(cfg, device, out: Path) -> None:
    from exmap_ray.heatmaps import HEATMAP_METHODS
    from exmap_ray.spec import HeatmapSpec

    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # fp32 as on the CPU
    rows, maps = [], {}
    try:
        f = flags(device, "fp32 and bf16", False, len(x))
        print(f"methods: test_resnet at 32 px, {device.type} against CPU ({show(f)})")
        for name, keys in method_list():
            label = name + ("-gamma4" if keys else "")
            hspec = HeatmapSpec(precision="fp32", **keys)
            cpu, pred = HEATMAP_METHODS.get(name)(bn_resnet("test_resnet", 3), hspec)(x)
            model = bn_resnet("test_resnet", 3).to(device)
            t0 = time.perf_counter()
            dev, dpred = HEATMAP_METHODS.get(name)(model, hspec)(x.to(device))
            sync(device)
            secs = time.perf_counter() - t0
            scale = cpu.flatten(1).abs().amax(1).clamp(min=1e-12)
            err = ((dev.cpu() - cpu).flatten(1).abs().amax(1) / scale).max()
            half, _ = HEATMAP_METHODS.get(name)(model, HeatmapSpec(precision="bf16", **keys))(x.to(device))
            cos = F.cosine_similarity(half.cpu().flatten(1), cpu.flatten(1), dim=1)
            row = {
                "method": label,
                "same_pred": bool((dpred.cpu() == pred).all()),
                "fp32_max_rel_err": float(err),
                "bf16_cos_min": float(cos.min()),
                "first_call_s": secs,
            }
            rows.append(row)
            maps[label] = dev.cpu()
            print(
                f"  {label:<22} same class {row['same_pred']}, fp32 max rel err {err:.1e}, "
                f"bf16 cosine min {cos.min():.4f} (first call {secs:.2f} s)"
            )
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    pyplot = plt()
    fig, axes = pyplot.subplots(len(maps), 4, figsize=(6, 1.6 * len(maps)))
    for r, (label, m) in enumerate(maps.items()):
        for c in range(4):
            a = m[c].sum(0).numpy()
            v = np.abs(a).max() or 1.0
            axes[r, c].imshow(a, cmap="bwr", vmin=-v, vmax=v)
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
        axes[r, 0].set_ylabel(label, fontsize=7)
    fig.suptitle(f"heatmaps on {f['device']} (channel sum; red +, blue -)", fontsize=8)
    save(out, "methods", {"flags": f, "rows": rows}, fig)


def part_lrp_speed(cfg, device, out: Path) -> None:
    from exmap_ray.heatmaps import HEATMAP_METHODS
    from exmap_ray.models import autocast
    from exmap_ray.spec import HeatmapSpec

    cl = device.type == "cuda"
    model = build_model(cfg["speed_model"], 10, device, cl)
    bare = build_model(cfg["speed_model"], 10, device, cl).requires_grad_(False)
    x = torch.randn(cfg["batch"], 3, cfg["size"], cfg["size"], device=device)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    precision = "bf16" if device.type == "cuda" else "fp32"
    f = flags(device, precision, cl, cfg["batch"])
    print(f"lrp_speed: {cfg['speed_model']} at {cfg['size']} px ({show(f)}); LRP fp32 rows with TF32 as flagged")

    def bound(p):
        def fn():  # forward + backward to the input: the floor of every gradient heatmap
            xi = x.detach().requires_grad_(True)
            with autocast(device.type, p):
                logits = bare(xi)
            torch.autograd.grad(logits.gather(1, logits.argmax(1, keepdim=True)).sum(), xi)

        return fn

    fns = {"bound (forward+backward to input)": bound(precision)}
    for label, name, keys, p in [
        ("input_x_gradient", "input_x_gradient", {}, precision),
        ("gradcam", "gradcam", {}, precision),
        ("lrp alpha2beta1", "lrp", {}, precision),
        ("lrp gamma4", "lrp", {"conv_rule": "gamma", "gamma": 4.0}, precision),
        ("bound fp32", None, None, "fp32"),
        ("lrp alpha2beta1 fp32", "lrp", {}, "fp32"),
    ]:
        if name is None:
            fns[label] = bound(p)
            continue
        method = HEATMAP_METHODS.get(name)(model, HeatmapSpec(precision=p, **keys))
        fns[label] = (lambda m: lambda: m(x))(method)
    t = timed_together(fns, device, cfg["repeats"])
    tb = t["bound (forward+backward to input)"]
    rows = [{"pass": k, "img_per_s": cfg["batch"] / s, "of_bound": tb / s} for k, s in t.items()]
    for r in rows:
        print(f"  {r['pass']:<34} {r['img_per_s']:>8.0f} img/s  {r['of_bound']:>5.0%} of the {precision} bound")
    if device.type == "cuda":
        print(f"  peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    pyplot = plt()
    fig, ax = pyplot.subplots(figsize=(6, 3))
    ax.barh([r["pass"] for r in rows][::-1], [r["img_per_s"] for r in rows][::-1])
    ax.axvline(rows[0]["img_per_s"], color="k", ls="--", lw=0.8)
    ax.set_xlabel("images / s")
    ax.set_title(f"{cfg['speed_model']} {cfg['size']} px, batch {cfg['batch']}, {f['device']}", fontsize=8)
    save(out, "lrp_speed", {"flags": f, "model": cfg["speed_model"], "size": cfg["size"], "rows": rows}, fig)


def torch_kmeans(X: torch.Tensor, init: torch.Tensor, niter: int) -> torch.Tensor:
    """Plain Lloyd iterations on the device: assignments by ||x||^2 - 2 x.c + ||c||^2, means by index_add."""
    C = init.clone()
    x2 = (X * X).sum(1, keepdim=True)
    for _ in range(niter):
        labels = (x2 - 2 * X @ C.T + (C * C).sum(1)).argmin(1)
        sums = torch.zeros_like(C).index_add_(0, labels, X)
        counts = torch.bincount(labels, minlength=len(C)).clamp(min=1).to(X.dtype)[:, None]
        C = torch.where(counts > 0, sums / counts, C)
    return (x2 - 2 * X @ C.T + (C * C).sum(1)).argmin(1)


def part_kmeans(cfg, device, out: Path) -> None:
    from sklearn.metrics import adjusted_rand_score

    from exmap_ray.clustering import kmeans, kmeanspp_init
    from exmap_ray.clustering.scale import _faiss_gpu

    n, d, k, niter = cfg["kmeans_n"], cfg["kmeans_d"], cfg["kmeans_k"], 25
    rng = np.random.default_rng(0)
    truth = rng.integers(0, k, n)
    X = rng.normal(0, 4, (k, d)).astype(np.float32)[truth] + rng.standard_normal((n, d), dtype=np.float32)
    f = flags(device, "fp32", False, n)
    f["faiss_gpu"] = _faiss_gpu()
    print(f"kmeans: {n:,} x {d}, k {k}, {niter} iterations ({show(f)})")
    t0 = time.perf_counter()
    ours = kmeans(X, k, niter=niter, nredo=1, seed=0)
    t_ours = time.perf_counter() - t0
    init = kmeanspp_init(X[rng.choice(n, min(n, 256 * k), replace=False)], k, np.random.default_rng(1))
    Xd = torch.from_numpy(X).to(device)
    Cd = torch.from_numpy(np.ascontiguousarray(init, dtype=np.float32)).to(device)
    torch_kmeans(Xd[:1000], Cd, 1)  # warm-up: kernels, allocator
    sync(device)
    t0 = time.perf_counter()
    Xd = torch.from_numpy(X).to(device)
    lab = torch_kmeans(Xd, Cd, niter).cpu().numpy()
    sync(device)
    t_torch = time.perf_counter() - t0
    big = torch.empty(X.size, device=device)
    t_copy = statistics.median(_timed(lambda: big.clone(), device) for _ in range(5))
    bound = niter * X.nbytes / (2 * X.nbytes / t_copy)  # a copy reads and writes
    rec = {
        "flags": f,
        "n": n,
        "d": d,
        "k": k,
        "niter": niter,
        "project_kmeans_s": t_ours,
        "torch_lloyd_s": t_torch,
        "bandwidth_bound_s": bound,
        "ari_project_vs_torch": adjusted_rand_score(ours, lab),
        "ari_project_vs_truth": adjusted_rand_score(truth, ours),
        "ari_torch_vs_truth": adjusted_rand_score(truth, lab),
    }
    where = "GPU" if f["faiss_gpu"] else "CPU"
    print(
        f"  exmap_ray.clustering.kmeans {t_ours:.2f} s (FAISS {where}); torch Lloyd on {device.type} "
        f"{t_torch:.2f} s incl. the host-to-device copy; bandwidth bound {bound:.3f} s"
    )
    print(
        f"  ARI project vs torch {rec['ari_project_vs_torch']:.4f}; vs truth: project "
        f"{rec['ari_project_vs_truth']:.4f}, torch {rec['ari_torch_vs_truth']:.4f}"
    )
    pyplot = plt()
    fig, ax = pyplot.subplots(figsize=(5, 2))
    ax.barh(["bandwidth bound", f"torch Lloyd ({device.type})", "clustering.kmeans"], [bound, t_torch, t_ours])
    ax.set_xscale("log")
    ax.set_xlabel("seconds")
    ax.set_title(f"k-means {n:,} x {d}, k {k}, {niter} it.", fontsize=8)
    save(out, "kmeans", rec, fig)


def _timed(fn, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def part_bf16(cfg, device, out: Path) -> None:
    from exmap_ray.heatmaps.lrp import LRP
    from exmap_ray.models import embed
    from exmap_ray.spec import HeatmapSpec

    n, size = cfg["bf16_n"], cfg["bf16_size"]
    x = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1)).to(device)
    f = flags(device, "bf16 vs fp32", False, n)
    print(f"bf16: LRP under bf16 autocast vs fp32, {n} signed images at {size} px ({show(f)})")
    rows, cosines = [], {}
    for backbone in cfg["bf16_models"]:
        m = bn_resnet(backbone, 2).to(device)
        f_ref, _ = (torch.from_numpy(a).to(device) for a in embed(m, x, device=str(device), precision="fp32"))
        for rule in ({"conv_rule": "alpha_beta"}, {"conv_rule": "gamma", "gamma": 4.0}):
            full = LRP(m, HeatmapSpec(precision="fp32", **rule)).explain(x)
            half = LRP(m, HeatmapSpec(precision="bf16", **rule)).explain(x)
            same = (full.pred == half.pred).cpu()
            a = full.relevance.flatten(1).double().cpu()[same]
            b = half.relevance.flatten(1).double().cpu()[same]
            cos = F.cosine_similarity(a, b, dim=1)
            rel = (b - a).norm(dim=1) / a.norm(dim=1)
            tot = (b.sum(1) - a.sum(1)).abs()
            fe = ((half.features - f_ref).abs().max() / f_ref.abs().max()).item()
            row = {
                "model": backbone,
                "rule": rule["conv_rule"],
                "same_pred": int(same.sum()),
                "n": n,
                "cos_min": cos.min().item(),
                "rel_l2_median": rel.median().item(),
                "rel_l2_max": rel.max().item(),
                "total_fp32_mean": a.sum(1).mean().item(),
                "total_abs_diff_max": tot.max().item(),
                "features_max_err": fe,
            }
            rows.append(row)
            cosines[f"{backbone} {rule['conv_rule']}"] = cos.numpy()
            print(
                f"  {backbone:<9} {rule['conv_rule']:<10} same class {row['same_pred']}/{n}; cosine min "
                f"{row['cos_min']:.4f}; rel L2 median {row['rel_l2_median']:.1e} "
                f"max {row['rel_l2_max']:.1e}; relevance total fp32 {row['total_fp32_mean']:.3f}, "
                f"|bf16-fp32| max {row['total_abs_diff_max']:.1e}; "
                f"features max err {fe:.1e}"
            )
    pyplot = plt()
    fig, ax = pyplot.subplots(figsize=(5, 2.5))
    for label, c in cosines.items():
        ax.plot(np.sort(1 - c), np.linspace(0, 1, len(c)), label=label)
    ax.set_xscale("log")
    ax.set_xlabel("1 - cosine(bf16 map, fp32 map), per image")
    ax.set_ylabel("fraction of images")
    ax.legend(fontsize=6)
    save(out, "bf16", {"flags": f, "rows": rows}, fig)


def part_erm_step(cfg, device, out: Path) -> None:
    from torch.utils.data import DataLoader, TensorDataset

    from exmap_ray.erm import make_optimizer, train_epoch
    from exmap_ray.models import autocast, create_model
    from exmap_ray.spec import ErmSpec

    cl = device.type == "cuda"
    precision = "bf16" if device.type == "cuda" else "fp32"
    B, size, steps = cfg["erm_batch"], cfg["size"], cfg["erm_steps"]
    f = flags(device, precision, cl, B)
    print(f"erm_step: {cfg['erm_model']} at {size} px, {steps} steps ({show(f)})")
    e = ErmSpec()
    model = create_model(cfg["erm_model"], 2).to(device).train()
    if cl:
        model = model.to(memory_format=torch.channels_last)
    opt = make_optimizer(model.parameters(), e)
    x = torch.randn(B, 3, size, size, device=device)
    x = x.contiguous(memory_format=torch.channels_last) if cl else x
    y = torch.randint(0, 2, (B,), device=device)

    def bare():
        for _ in range(steps):
            with autocast(device.type, precision):
                loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    host = TensorDataset(torch.randn(B * steps, 3, size, size), torch.randint(0, 2, (B * steps,)))
    loader = DataLoader(host, batch_size=B, shuffle=False, pin_memory=device.type == "cuda")
    t = timed_together(
        {"bare step": bare, "erm.train_epoch": lambda: train_epoch(model, loader, opt, device, precision, cl)},
        device,
        2,
    )
    rows = [{"loop": k, "img_per_s": B * steps / s} for k, s in t.items()]
    for r in rows:
        share = r["img_per_s"] / rows[0]["img_per_s"]
        print(f"  {r['loop']:<16} {r['img_per_s']:>8.0f} img/s  {share:>5.0%}")
    pyplot = plt()
    fig, ax = pyplot.subplots(figsize=(5, 1.6))
    ax.barh([r["loop"] for r in rows], [r["img_per_s"] for r in rows])
    ax.set_xlabel("images / s")
    ax.set_title(f"ERM {cfg['erm_model']} {size} px, batch {B}, {precision}", fontsize=8)
    save(out, "erm_step", {"flags": f, "model": cfg["erm_model"], "rows": rows}, fig)


def summary(out: Path) -> None:
    lines = ["# GPU check summary", ""]
    for part in PARTS:
        p = out / f"{part}.json"
        if not p.exists():
            lines += [f"## {part}: no result (timed out or failed: see its log)", ""]
            continue
        rec = json.loads(p.read_text())
        lines += [f"## {part}", "", f"flags: {show(rec.pop('flags'))}", "", "```", json.dumps(rec, indent=1), "```", ""]
    (out / "summary.md").write_text("\n".join(lines))
    print(f"summary: {out / 'summary.md'}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("part", choices=PARTS + ["summary"])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "gpu_check_out"))
    ap.add_argument("--tiny", action="store_true", help="small models and sizes (always so without CUDA)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.part == "summary":
        summary(args.out)
        return 0
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    cfg = TINY if (args.tiny or not on_gpu) else GPU
    if on_gpu:
        torch.backends.cudnn.benchmark = True
    t0 = time.perf_counter()
    {
        "methods": part_methods,
        "lrp_speed": part_lrp_speed,
        "kmeans": part_kmeans,
        "bf16": part_bf16,
        "erm_step": part_erm_step,
    }[args.part](cfg, device, args.out)
    print(f"  ({args.part}: {time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
