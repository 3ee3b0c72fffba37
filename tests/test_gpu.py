"""GPU checks (marker `gpu`): skipped, with the reason, where torch sees no CUDA device.

    .venv/bin/python -m pytest -m gpu tests/test_gpu.py -p no:cacheprovider      # on a GPU machine

- ERM for an epoch through Ray Train on NCCL, with 1 and (where there are two GPUs) 2 workers, in
  bf16 autocast (erm.precision auto);
- every heatmap method on the GPU against the same method on the CPU: fp32 (TF32 off) to 1e-3, and
  bf16 autocast (heatmaps.precision auto) by per-image cosine and LRP's relevance total;
- k-means through exmap_ray.clustering.kmeans (FAISS GPU where that build is installed) against
  scikit-learn's CPU k-means on the same points;
- the whole demo, `exmap-ray run tune_specs/cmnist.yaml`, in a subprocess, on the GPU.
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

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch sees none)")]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def exact_fp32():
    """fp32 on the GPU as on the CPU: no TF32 in convolutions and matmuls while the test runs."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize("workers", [1, 2])
def test_erm_one_epoch_on_nccl(ray_local, tmp_path, workers):
    from exmap_ray.erm import train_erm
    from exmap_ray.models import load_checkpoint
    from exmap_ray.spec import from_dict
    from exmap_ray.storage import read_json

    if torch.cuda.device_count() < workers:
        pytest.skip(f"needs {workers} GPUs, torch sees {torch.cuda.device_count()}")
    spec = from_dict(tiny_spec_dict(erm={"epochs": 1, "num_workers": workers, "batch_size": 64},
                                    resources={"gpu": True}))
    info = train_erm(spec, tmp_path, n_classes=2)
    assert info["use_gpu"] and info["workers"] == workers
    (h,) = read_json(tmp_path / "history.json")
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


@pytest.mark.parametrize("method,keys", _methods(), ids=lambda v: v if isinstance(v, str) else
                         "-".join(f"{k}{w}" for k, w in v.items()) or "default")
def test_gpu_heatmaps_equal_cpu_heatmaps(method, keys, exact_fp32):
    from exmap_ray.heatmaps import HEATMAP_METHODS
    from exmap_ray.spec import HeatmapSpec

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


def test_gpu_kmeans_agrees_with_cpu():
    import faiss
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score

    from exmap_ray.clustering import kmeans

    if not (hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0):
        pytest.skip("FAISS has no GPU here (faiss-cpu installed): pip uninstall -y faiss-cpu && "
                    "pip install -e '.[gpu]'")
    rng = np.random.default_rng(0)
    centers = rng.normal(0, 4, (6, 64)).astype(np.float32)
    truth = rng.integers(0, 6, 20000)
    X = centers[truth] + rng.normal(0, 1, (20000, 64)).astype(np.float32)
    gpu = kmeans(X, 6, niter=25, nredo=3, seed=0)
    cpu = KMeans(6, n_init=3, random_state=0).fit_predict(X)
    assert adjusted_rand_score(cpu, gpu) >= 0.99 and adjusted_rand_score(truth, gpu) >= 0.99


def test_demo_runs_on_the_gpu(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "TQDM_DISABLE": "1"}
    proc = subprocess.run([sys.executable, "-m", "exmap_ray", "run", str(ROOT / "tune_specs" / "cmnist.yaml"),
                           "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    spec = json.loads((out / "spec.resolved.json").read_text())
    assert spec["resources"]["gpu"] is True  # every stage ran with the GPU
    results = json.loads((out / "results.json").read_text())
    assert results  # the table's figures; their values are the CPU demo's business (tests/test_e2e.py)
