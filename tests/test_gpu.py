"""GPU checks (marker `gpu`): skipped, with the reason, where torch sees no CUDA device.

    .venv/bin/python -m pytest -m gpu tests/test_gpu.py -p no:cacheprovider      # on a GPU machine

Each test fails when the GPU path is wrong, not only when it crashes: it asserts where each stage ran
(the CUDA device a stage records, `environment.gpu`, Ray's GPU ids), with the flags users get
(`resources.configure_cuda`: TF32 off for fp32, cuDNN autotuning), through the same code the pipeline
runs (Ray Train, the heatmap actors, the clusters stage's GPU route):
- ERM for an epoch through Ray Train: 1 worker on NCCL, and 2 workers sharing one GPU (erm.worker_gpus
  0.5, gloo over CUDA tensors: NCCL refuses two ranks on one device), whose all-reduce must run;
- heatmaps through the actor pool, two actors sharing a GPU, against the same method on the CPU: fp32
  to 1e-3, and bf16 autocast (heatmaps.precision auto) by per-image cosine and LRP's relevance total;
- k-means on the GPU route: torch's k-means where FAISS's GPU build is absent (FAISS's otherwise),
  against scikit-learn's CPU k-means on the same points;
- the whole demo, `exmap-ray run tune_specs/cmnist.yaml`, in a subprocess: every stage on the GPU.
The logical-GPU tests (tests/test_gpu_schedule.py) prove the schedule without a GPU; these prove the
device side on one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from .conftest import tiny_spec_dict

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch sees none)"),
]
ROOT = Path(__file__).resolve().parents[1]


def gpu_spec(**over):
    from exmap_ray.spec import from_dict

    d = tiny_spec_dict(**over)
    d["resources"] = {**d["resources"], "gpu": True}
    return from_dict(d)


def on_cuda(p: dict) -> None:
    """A stage's placement record: a Ray worker that computed on the CUDA device Ray assigned it."""
    assert p["ray_worker"] and p["gpu_ids"] and str(p["device"]).startswith("cuda") and not p["fake_cuda"], p


@pytest.mark.parametrize("workers,share", [(1, 1.0), (2, 0.5)], ids=["1-worker-nccl", "2-workers-1-gpu-gloo"])
def test_erm_one_epoch_on_the_gpu(ray_local, tmp_path, workers, share):
    from exmap_ray.erm import train_erm
    from exmap_ray.models import load_checkpoint
    from exmap_ray.storage import read_json

    spec = gpu_spec(erm={"epochs": 1, "num_workers": workers, "batch_size": 64, "worker_gpus": share})
    info = train_erm(spec, tmp_path, n_classes=2)
    env = info["environment"]
    assert info["use_gpu"] and info["workers"] == workers
    assert env["gpu"] == torch.cuda.get_device_name(0), env  # rank 0 really computed on the GPU
    assert env["backend"] == ("nccl" if share == 1.0 else "gloo") and env["tf32"] is False
    on_cuda(env["placement"])
    (h,) = read_json(tmp_path / "history.json")
    # with 2 workers each scores half of val and the counts are all-reduced: a broken collective fails here
    assert np.isfinite(h["train_loss"]) and 0.0 <= h["val_acc"] <= 1.0
    model = load_checkpoint("test_resnet", 2, tmp_path / "model.pt")  # saved on the CPU, loads there
    assert model(torch.rand(2, 3, 28, 28)).shape == (2, 2)


def _resnet():
    import timm

    torch.manual_seed(0)
    m = timm.create_model("test_resnet", num_classes=3).eval()
    g = torch.Generator().manual_seed(1)
    for bn in m.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.running_mean.copy_(torch.rand(bn.num_features, generator=g) * 0.4 - 0.2)
            bn.running_var.copy_(torch.rand(bn.num_features, generator=g) * 1.5 + 0.5)
    return m


def _methods():
    from exmap_ray.heatmaps import HEATMAP_METHODS

    out = [(name, {}) for name in HEATMAP_METHODS.names()]
    return out + [("lrp", {"conv_rule": "gamma", "gamma": 4.0})]


@pytest.mark.parametrize(
    "method,keys",
    _methods(),
    ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}{w}" for k, w in v.items()) or "default",
)
def test_gpu_heatmaps_equal_cpu_heatmaps_with_the_flags_users_get(method, keys):
    """fp32 on the GPU with the pipeline's own flags (configure_cuda: TF32 off) against the CPU."""
    from exmap_ray.heatmaps import HEATMAP_METHODS
    from exmap_ray.resources import configure_cuda
    from exmap_ray.spec import HeatmapSpec

    configure_cuda("cuda:0", "fp32")
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    model = _resnet()
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    cpu, pred = HEATMAP_METHODS.get(method)(model, HeatmapSpec(precision="fp32", **keys))(x)
    gpu_model = _resnet().cuda()
    gpu, gpred = HEATMAP_METHODS.get(method)(gpu_model, HeatmapSpec(precision="fp32", **keys))(x.cuda())
    assert (gpred.cpu() == pred).all()
    err = ((gpu.cpu() - cpu).flatten(1).abs().amax(1) / cpu.flatten(1).abs().amax(1).clamp(min=1e-12)).max()
    # cuDNN and oneDNN sum in other orders; LRP's divisions by small denominators amplify that a little
    assert err <= 1e-3, f"{method} {keys}: GPU fp32 vs CPU relative error {err:.2e}"

    # bf16 autocast (the GPU default): the same maps up to bf16 rounding
    half, _ = HEATMAP_METHODS.get(method)(gpu_model, HeatmapSpec(precision="auto", **keys))(x.cuda())
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
    cos = torch.nn.functional.cosine_similarity(half.cpu().flatten(1), cpu.flatten(1), dim=1)
    assert cos.min() >= 0.95, f"{method} {keys}: bf16 vs fp32 per-image cosine {cos.min():.3f}"
    if method == "lrp":  # relevance totals (conservation) survive bf16: the divisions run in fp32
        torch.testing.assert_close(half.cpu().flatten(1).sum(1), cpu.flatten(1).sum(1), rtol=0, atol=0.03)


def test_heatmap_actors_share_a_gpu_and_match_the_cpu(ray_local, tmp_path):
    """Through the actor pool (two actors on GPU 0, heatmaps.actors_per_gpu 2), fp32: each actor computed
    on CUDA, and the stage's maps equal a CPU extraction of the same model to 1e-3."""
    from exmap_ray.data import build_dataset
    from exmap_ray.heatmaps import HEATMAP_METHODS
    from exmap_ray.heatmaps.extract import HeatmapShards, extract, extract_with_actors
    from exmap_ray.models import create_model, save_checkpoint

    spec = gpu_spec(heatmaps={"num_actors": 2, "actors_per_gpu": 2, "shard_size": 50, "precision": "fp32"})
    data = build_dataset(spec.dataset, spec.seed)
    torch.manual_seed(0)
    model = create_model(spec.model.backbone, data.n_classes).eval()
    save_checkpoint(model, tmp_path / "model.pt")
    info = extract_with_actors(spec, tmp_path / "model.pt", len(data.val), tmp_path / "hm")
    assert info["actors"] == 2 and len(info["placements"]) == 2
    for p in info["placements"]:
        on_cuda(p)
    got = HeatmapShards(tmp_path / "hm").load()
    want, _, _, _ = extract(HEATMAP_METHODS.get("lrp")(model, spec.heatmaps), data.val.images, 64, 7)
    scale = np.maximum(np.abs(want).reshape(len(want), -1).max(1), 1e-12)
    err = np.abs(got - want).reshape(len(want), -1).max(1) / scale
    assert err.max() <= 1e-3, f"actors on the GPU vs the CPU: relative error {err.max():.2e}"


def test_gpu_kmeans_route_agrees_with_cpu():
    """The clusters stage's GPU route (clustering_device): torch's k-means where FAISS's GPU build is absent
    (this test's point), FAISS's GPU build where it is installed."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score

    from exmap_ray.clustering import kmeans
    from exmap_ray.clustering.device import clustering_device, faiss_gpu, torch_route
    from exmap_ray.clustering.kmeans import kmeans_torch

    rng = np.random.default_rng(0)
    centers = rng.normal(0, 4, (6, 64)).astype(np.float32)
    truth = rng.integers(0, 6, 20000)
    X = centers[truth] + rng.normal(0, 1, (20000, 64)).astype(np.float32)
    cpu = KMeans(6, n_init=3, random_state=0).fit_predict(X)
    with clustering_device("cuda:0"):
        assert torch_route() == (None if faiss_gpu() else "cuda:0")
        routed = kmeans(X, 6, niter=25, nredo=3, seed=0)
    on_torch = kmeans_torch(X, 6, 25, 3, np.random.default_rng(0), "cuda:0")  # the torch route, in any case
    for labels in (routed, on_torch):
        assert adjusted_rand_score(cpu, labels) >= 0.99 and adjusted_rand_score(truth, labels) >= 0.99


def test_demo_runs_every_stage_on_the_gpu(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "TQDM_DISABLE": "1"}
    env.pop("EXMAP_RAY_FAKE_CUDA", None)
    proc = subprocess.run(
        [sys.executable, "-m", "exmap_ray", "run", str(ROOT / "tune_specs" / "cmnist.yaml"), "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    spec = json.loads((out / "spec.resolved.json").read_text())
    assert spec["resources"]["gpu"] is True
    results = json.loads((out / "results.json").read_text())
    assert results["environment"]["erm"]["gpu"] == torch.cuda.get_device_name(0)  # ERM trained on the GPU
    assert results["environment"]["driver"]["gpu"] is None  # the driver took no CUDA context
    done = {name: json.loads((Path(c["dir"]) / "done").read_text()) for name, c in results["cache"].items()}
    on_cuda(done["features"]["placement"])
    on_cuda(done["clusters"]["placement"])
    assert done["heatmaps"]["device"] == "cuda" and done["heatmaps"]["placements"]
    for p in done["heatmaps"]["placements"]:
        on_cuda(p)
    assert 0.0 <= results["robust"]["test"]["worst_group_acc"] <= 1.0
