"""LRP under bf16 autocast against fp32, on trained models: conservation, map agreement, pseudo groups.

    # two trained models (the demo's resnet10t at 28 px, and a resnet18 on C-MNIST upscaled to 64 px):
    exmap-ray run cmnist --out /tmp/bf16run
    exmap-ray run cmnist --set model.backbone=resnet18 --set dataset.image_size=64 --set erm.epochs=2 \\
        --out /tmp/r18run
    nice -n 10 .venv/bin/python benchmarks/bf16_lrp.py --run /tmp/bf16run
    nice -n 10 .venv/bin/python benchmarks/bf16_lrp.py --run /tmp/r18run --n 1000 --spec-rule-only

For each finished run: its ERM checkpoint and spec, its val split, and LRP with each conv rule (the
spec's, and the other at the paper's/reference's values: alpha2beta1, gamma 4) in fp32 and under
bf16 autocast (CPU here; `heatmaps.precision: bf16`). Reported, over the val images both
precisions explain as the same class:
- conservation: each map's total relevance. The seed is a one-hot 1 at the explained class, so a
  fully conservative pass gives 1; BatchNorm folded into biases absorbs some in fp32 already, so
  what bf16 must keep is fp32's total (|bf16 - fp32| per image);
- each layer's own error: at every rule-wrapped convolution, on 16 images, its bf16 output against
  fp32 (as a multiple of a plain bf16 convolution's error on the same input), and its bf16 backward
  against the fp32 rule given the same input and relevance (|sum R_in difference| / sum |R_out|);
- agreement: per-image cosine and relative L2 error ||bf16 - fp32|| / ||fp32|| of the full maps, and
  of the maps as clustering sees them (downsized to heatmaps.downsize);
- pseudo groups: the project's group inference (groups.infer_groups, the spec's clustering) on the
  fp32 maps and features and on the bf16 ones: ARI between the two, and each one's ARI with the true
  val groups (evaluation only). The fp32 spec-rule groups are checked against the run's own clusters
  stage.
Figures are printed, never asserted. Times are CPU times on a shared machine: not a GPU's figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from exmap_ray.data import build_dataset  # noqa: E402
from exmap_ray.groups import infer_groups  # noqa: E402
from exmap_ray.heatmaps.lrp import LRP, _ConvRuleFn, record_conv_rules  # noqa: E402
from exmap_ray.models import create_model, embed, load_checkpoint  # noqa: E402
from exmap_ray.spec import from_dict  # noqa: E402
from exmap_ray.stages import group_context  # noqa: E402

OTHER_RULE = {
    "gamma": {"conv_rule": "alpha_beta", "alpha": 2.0, "beta": 1.0},
    "alpha_beta": {"conv_rule": "gamma", "gamma": 4.0},
}


def layer_errors(model, hspec, x: torch.Tensor) -> tuple[float, float]:
    """Each rule-wrapped convolution's own error under bf16, on batch x, the largest over the layers:
    - forward: max |z(bf16) - z(fp32)| of its output over that of a plain bf16 convolution of the
      same input with the same (folded) weight: 1 = as exact as a plain bf16 forward;
    - backward: |sum R_in(bf16) - sum R_in(fp32)| / sum |R_out| for the same input and relevance R_out,
      the fp32 rule run on what the bf16 pass handed the layer (its own conservation error)."""
    lrp = LRP(model, dataclasses.replace(hspec, precision="bf16"))
    fwd, bwd = record_conv_rules(lrp, x)
    f_ratio = 0.0
    for layer, xin, out in fwd:
        c = layer.conv
        exact = F.conv2d(xin, c.weight, c.bias, c.stride, c.padding, c.dilation, c.groups)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            plain = F.conv2d(xin, c.weight, c.bias, c.stride, c.padding, c.dilation, c.groups).float()
        plain_err = (plain - exact).abs().max().clamp(min=1e-30)
        f_ratio = max(f_ratio, ((out - exact).abs().max() / plain_err).item())
    b_err = 0.0
    for layer, xin, R, r_in in bwd:
        xd = xin.float().requires_grad_(True)
        (r32,) = torch.autograd.grad(_ConvRuleFn.apply(xd, layer), xd, R.float())  # the fp32 rule
        b_err = max(b_err, ((r_in.double().sum() - r32.double().sum()).abs() / R.double().abs().sum()).item())
    return f_ratio, b_err


def explain_all(lrp: LRP, images, batch: int, downsize: int | None):
    maps, small, preds, feats, logits = [], [], [], [], []
    for x in DataLoader(images, batch_size=batch, shuffle=False):
        e = lrp.explain(x)
        maps.append(e.relevance.float())
        small.append(
            F.interpolate(e.relevance.float(), size=(downsize, downsize), mode="bilinear", align_corners=False)
            if downsize and e.relevance.shape[-1] != downsize
            else e.relevance.float()
        )
        preds.append(e.pred)
        feats.append(e.features)
        logits.append(e.logits)
    return (torch.cat(maps), torch.cat(small), torch.cat(preds), torch.cat(feats).numpy(), torch.cat(logits).numpy())


def per_image(a: torch.Tensor, b: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """cosine and relative L2 error of b against reference a, per image."""
    a, b = a.flatten(1).double(), b.flatten(1).double()
    cos = F.cosine_similarity(a, b, dim=1)
    rel = (b - a).norm(dim=1) / a.norm(dim=1).clamp(min=1e-30)
    return cos.numpy(), rel.numpy()


def q(v: np.ndarray) -> str:
    return f"min {v.min():.4f} / 1% {np.quantile(v, 0.01):.4f} / median {np.median(v):.4f}"


def qmax(v: np.ndarray) -> str:
    return f"median {np.median(v):.2e} / 99% {np.quantile(v, 0.99):.2e} / max {v.max():.2e}"


def trained_model(run_dir: Path, backbone: str, n_classes: int):
    """(model, results or None, how it was trained): a finished run's ERM model, or for a run stopped
    during ERM the last epoch checkpoint Ray Train kept (cache/erm-*/ray_train/erm/checkpoint_*)."""
    if (run_dir / "results.json").exists():
        results = json.loads((run_dir / "results.json").read_text())
        erm = Path(results["cache"]["erm"]["dir"])
        epochs = len(json.loads((erm / "history.json").read_text()))
        return (
            load_checkpoint(backbone, n_classes, erm / "model.pt"),
            results,
            f"ERM {epochs} epochs, test WGA {results['erm']['test']['worst_group_acc']:.3f}",
        )
    ckpts = sorted(run_dir.glob("cache/erm-*/ray_train/erm/checkpoint_*/state.pt"))
    if not ckpts:
        raise SystemExit(f"bf16_lrp: {run_dir} has neither results.json nor an ERM checkpoint")
    state = torch.load(ckpts[-1], map_location="cpu", weights_only=True)
    model = create_model(backbone, n_classes)
    model.load_state_dict(state["model"])
    hist = json.loads((ckpts[-1].parent / "history.json").read_text())[-1]
    return (
        model.eval(),
        None,
        f"an unfinished run: ERM checkpoint after epoch {state['epoch'] + 1}, val acc {hist['val_acc']:.3f}",
    )


def run_one(run_dir: Path, n: int | None, batch: int, both: bool) -> None:
    from sklearn.metrics import adjusted_rand_score as ari

    spec = from_dict(json.loads((run_dir / "spec.resolved.json").read_text()))
    data = build_dataset(spec.dataset, spec.seed)
    model, results, trained = trained_model(run_dir, spec.model.backbone, data.n_classes)
    val = data.val
    idx = np.arange(len(val))
    if n and n < len(val):  # the first n images and every image of the two smallest true groups (chosen
        # with the true groups, which only pick the subset: the clustering never sees them)
        small = np.argsort(np.bincount(val.group))[:2]
        idx = np.union1d(idx[:n], np.flatnonzero(np.isin(val.group, small)))
    n = len(idx)
    images = torch.utils.data.Subset(val.images, idx)
    y, true = val.y[idx], val.group[idx]
    size = spec.dataset.image_size or 28
    print(
        f"\n## {spec.model.backbone} at {size} px, C-MNIST ({run_dir}; {trained}), {n} val images, "
        f"downsize {spec.heatmaps.downsize}"
    )
    h = spec.heatmaps
    own = f" {h.gamma:g}" if h.conv_rule == "gamma" else f" {h.alpha:g}/{h.beta:g}"
    other = OTHER_RULE[h.conv_rule]
    rules = [("spec: " + h.conv_rule + own, {}), ("other: " + other["conv_rule"], other)][: 2 if both else 1]
    probe = next(iter(DataLoader(images, batch_size=min(16, n), shuffle=False)))
    f32, _ = embed(model, images, precision="fp32")
    f16, _ = embed(model, images, precision="bf16")
    plain = np.abs(f16 - f32).max() / np.abs(f32).max()  # what a plain bf16 forward gives (test's features)
    for label, keys in rules:
        out = {}
        for precision in ("fp32", "bf16"):
            hs = dataclasses.replace(h, precision=precision, **keys)
            lrp = LRP(model, hs)
            t0 = time.perf_counter()
            maps, small, pred, feat, logit = explain_all(lrp, images, batch, h.downsize)
            secs = time.perf_counter() - t0
            ctx = group_context(dataclasses.replace(spec, heatmaps=hs), y, true, feat, logit, small.numpy())
            groups, info = infer_groups(spec.groups.source, ctx)
            out[precision] = dict(maps=maps, small=small, pred=pred, groups=groups, secs=secs, feat=feat)
        a, b = out["fp32"], out["bf16"]
        same = (a["pred"] == b["pred"]).numpy()
        tot_a = a["maps"].flatten(1).double().sum(1).numpy()[same]
        tot_b = b["maps"].flatten(1).double().sum(1).numpy()[same]
        cos, rel = per_image(a["maps"][same], b["maps"][same])
        cos_s, rel_s = per_image(a["small"][same], b["small"][same])
        fe = np.abs(b["feat"] - a["feat"]).max() / np.abs(a["feat"]).max()
        print(f"\n### {label}")
        print(f"- same explained class: {same.sum()}/{n}; CPU seconds fp32 {a['secs']:.0f}, bf16 {b['secs']:.0f}")
        print(
            f"- total relevance (seed 1): fp32 median {np.median(tot_a):.4f}, "
            f"bf16 median {np.median(tot_b):.4f}; "
            f"|bf16 - fp32| {qmax(np.abs(tot_b - tot_a))}"
        )
        f_ratio, b_err = layer_errors(model, dataclasses.replace(h, **keys), probe)
        print(
            f"- each conv's own bf16 error, the largest over the layers ({len(probe)} images): forward "
            f"{f_ratio:.2f}x a plain bf16 conv's; backward conservation vs fp32's rule {b_err:.1e} "
            f"of sum|R_out|"
        )
        print(f"- full maps: cosine {q(cos)}; rel. L2 error {qmax(rel)}")
        print(f"- downsized maps: cosine {q(cos_s)}; rel. L2 error {qmax(rel_s)}")
        print(
            f"- features of the LRP forward: max |bf16 - fp32| / max |fp32| = {fe:.2e} "
            f"(a plain bf16 forward, "
            f"models.embed: {plain:.2e})"
        )
        print(
            f"- pseudo groups: fp32 {len(np.unique(a['groups']))}, bf16 {len(np.unique(b['groups']))}; "
            f"ARI(fp32, bf16) {ari(a['groups'], b['groups']):.4f}; ARI with true groups: fp32 "
            f"{ari(true, a['groups']):.4f}, bf16 {ari(true, b['groups']):.4f}"
        )
        if not keys and n == len(val) and results is not None:
            run_groups = np.load(Path(results["cache"]["clusters"]["dir"]) / "pseudo_groups.npy")
            print(f"- check: fp32 groups vs the run's clusters stage: ARI {ari(run_groups, a['groups']):.4f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--run",
        action="append",
        type=Path,
        required=True,
        help="an `exmap-ray run` folder (finished, or stopped after an ERM epoch)",
    )
    ap.add_argument(
        "--n",
        type=int,
        default=None,
        help="the first N val images and the two smallest true groups' (default: all val)",
    )
    ap.add_argument("--spec-rule-only", action="store_true", help="only the spec's conv rule")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, CPU, {args.threads} thread(s); bf16 = torch.autocast('cpu', bfloat16)")
    for r in args.run:
        run_one(r, args.n, args.batch, not args.spec_rule_only)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
