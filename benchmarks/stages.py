"""Per-stage time and throughput of a spec, plus core micro-benchmarks. Prints one JSON line per figure.

    python benchmarks/stages.py tune_specs/cmnist.yaml               # full run, fresh cache
    python benchmarks/stages.py tune_specs/cmnist.yaml --core-only   # heatmap methods and clustering only

Figures are measured, never asserted. The pipeline part runs `exmap-ray run` with a new
stage cache, so every stage is computed; Ray start-up and MLflow set-up are reported apart.
"""
from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from exmap_ray.clustering import kmeans, knn_affinity, laplacian_spectrum, normalize_rows
from exmap_ray.heatmaps import HEATMAP_METHODS
from exmap_ray.models import create_model
from exmap_ray.spec import load_spec


def emit(**kw):
    print(json.dumps(kw), flush=True)


def pipeline_figures(spec) -> None:
    import ray

    from exmap_ray.pipeline import preflight, run_pipeline

    t0 = time.perf_counter()
    ray.init(logging_level=logging.WARNING)
    emit(figure="ray_init_s", value=round(time.perf_counter() - t0, 2))
    with tempfile.TemporaryDirectory() as tmp:
        res = run_pipeline(spec, Path(tmp) / "run", data=preflight(spec))
    ray.shutdown()
    t, d = res["timings_s"], spec.dataset
    n_train = d.n_train if d.name == "cmnist" else None
    n_val = sum(res["exmap"]["pseudo_group_sizes"])
    emit(stage="erm", seconds=t["erm"], epochs=spec.erm.epochs, workers=spec.erm.num_workers,
         images_per_s_incl_startup=round(n_train * spec.erm.epochs / t["erm"], 1) if n_train else None)
    emit(stage="features", seconds=t["features"])
    emit(stage="heatmaps", method=spec.heatmaps.method, seconds=t["heatmaps"],
         images_per_s_incl_actor_startup=round(n_val / t["heatmaps"], 1))
    emit(stage="clusters", method=spec.clustering.method, scope=spec.clustering.scope, seconds=t["clusters"],
         points_per_s=round(n_val / max(t["clusters"], 1e-9), 1))
    emit(stage="dfr", seconds=t["dfr"], fits=2 * (spec.retrain.n_select_repeats * len(spec.retrain.dfr.c_grid)
                                                 + spec.retrain.dfr.n_final_fits))
    emit(stage="total", seconds=round(sum(t.values()), 2))


def core_figures(spec) -> None:
    torch.manual_seed(0)
    model = create_model(spec.model.backbone, 2).eval()
    size = spec.dataset.image_size or 28
    x = torch.rand(256, 3, size, size)
    with torch.no_grad():
        model(x[:8])
    for name in HEATMAP_METHODS.names():
        method = HEATMAP_METHODS.get(name)(model, spec.heatmaps)
        method(x[:16])  # warm-up
        t0 = time.perf_counter()
        reps = 3
        for _ in range(reps):
            method(x)
        dt = (time.perf_counter() - t0) / reps
        emit(core="heatmap", method=name, backbone=spec.model.backbone, px=size, batch=len(x),
             threads=torch.get_num_threads(), images_per_s=round(len(x) / dt, 1))
    t0 = time.perf_counter()
    reps = 3
    with torch.no_grad():
        for _ in range(reps):
            model(x)
    emit(core="forward_bound", backbone=spec.model.backbone, images_per_s=round(reps * len(x) / (time.perf_counter() - t0), 1))

    rng = np.random.default_rng(0)
    for n, d in ((3000, 147), (30000, 147), (30000, 2352), (200000, 147)):
        X = normalize_rows(rng.normal(size=(n, d)).astype(np.float32))
        t0 = time.perf_counter()
        kmeans(X, 8, niter=25, nredo=1, seed=0)
        dt = time.perf_counter() - t0
        emit(core="kmeans", n=n, d=d, k=8, niter=25, seconds=round(dt, 3), points_per_s=round(n / dt))
    for n, d in ((3000, 147), (20000, 147)):
        X = normalize_rows(rng.normal(size=(n, d)).astype(np.float32))
        t0 = time.perf_counter()
        laplacian_spectrum(knn_affinity(X))
        dt = time.perf_counter() - t0
        emit(core="spectral_knn_eig", n=n, d=d, seconds=round(dt, 3), points_per_s=round(n / dt))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("spec")
    ap.add_argument("--set", dest="sets", action="append", default=[])
    ap.add_argument("--core-only", action="store_true", help="skip the full pipeline run")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    spec = load_spec(args.spec, args.sets)
    core_figures(spec)
    if not args.core_only:
        pipeline_figures(spec)


if __name__ == "__main__":
    main()
