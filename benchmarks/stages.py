"""Per-stage time and throughput of a spec, plus core micro-benchmarks. Prints one JSON line per figure.

    python benchmarks/stages.py tune_specs/cmnist.yaml               # full run, fresh cache
    python benchmarks/stages.py tune_specs/cmnist.yaml --core-only   # heatmap methods and clustering only
    python benchmarks/stages.py exmap_ray/specs/cmnist.yaml --stages features,heatmaps \
        --erm-cache /tmp/erm-cache --repeats 3                       # those stages alone, ERM trained once

Figures are measured, never asserted. The pipeline part runs `exmap-ray run` with a new
stage cache, so every stage is computed; Ray start-up and MLflow set-up are reported apart.

`--stages` times the named stages alone, each repeat in a fresh cache holding only a copy of the
ERM stage (trained once into --erm-cache, reused after). It uses nothing but `stage_keys` and
`run_stages`, so the same script times an older checkout too (PYTHONPATH=that checkout): that is how
the features + heatmaps figure before and after val's one pass (docs/gpu.md) was taken.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
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
    n_val = sum(res["robust"]["pseudo_group_sizes"].values())  # group id -> members
    emit(
        stage="erm",
        seconds=t["erm"],
        epochs=spec.erm.epochs,
        workers=spec.erm.num_workers,
        images_per_s_incl_startup=round(n_train * spec.erm.epochs / t["erm"], 1) if n_train else None,
    )
    emit(stage="features", seconds=t["features"])
    emit(
        stage="heatmaps",
        method=spec.heatmaps.method,
        seconds=t["heatmaps"],
        images_per_s_incl_actor_startup=round(n_val / t["heatmaps"], 1),
    )
    emit(
        stage="clusters",
        method=spec.clustering.method,
        scope=spec.clustering.scope,
        seconds=t["clusters"],
        points_per_s=round(n_val / max(t["clusters"], 1e-9), 1),
    )
    emit(
        stage="dfr",
        seconds=t["retrain"],
        fits=2 * (spec.retrain.n_select_repeats * len(spec.retrain.dfr.c_grid) + spec.retrain.dfr.n_final_fits),
    )
    emit(stage="total", seconds=round(sum(t.values()), 2))


def stage_figures(spec, names: list[str], erm_cache: Path, repeats: int) -> None:
    """Seconds of the stages `names` (and their sum), each repeat computed afresh on the one cached ERM model."""
    import ray

    import exmap_ray
    from exmap_ray.pipeline import preflight
    from exmap_ray.resources import resolve_resources
    from exmap_ray.stages import Timer, run_stages, stage_keys
    from exmap_ray.cache import StageCache

    ray.init(logging_level=logging.WARNING)
    spec = resolve_resources(spec)
    data = preflight(spec)
    erm = run_stages(spec, data, StageCache(erm_cache), targets=["erm"])[0]["erm"]  # trained once, then reused
    for r in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            cache = StageCache(Path(tmp) / "cache")
            shutil.copytree(str(erm.dir), str(stage_keys(spec, cache, ["erm"])["erm"].dir))
            timer = Timer()
            run_stages(spec, data, cache, timer, targets=names)
            t = {n: timer.seconds[n] for n in names}
            emit(
                figure="stage_seconds",
                code=str(Path(exmap_ray.__file__).parent.parent),
                repeat=r,
                method=spec.heatmaps.method,
                n_val=len(data.val),
                n_test=len(data.test),
                **t,
                total=round(sum(t.values()), 2),
            )
    ray.shutdown()


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
        emit(
            core="heatmap",
            method=name,
            backbone=spec.model.backbone,
            px=size,
            batch=len(x),
            threads=torch.get_num_threads(),
            images_per_s=round(len(x) / dt, 1),
        )
    t0 = time.perf_counter()
    reps = 3
    with torch.no_grad():
        for _ in range(reps):
            model(x)
    emit(
        core="forward_bound",
        backbone=spec.model.backbone,
        images_per_s=round(reps * len(x) / (time.perf_counter() - t0), 1),
    )

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
    ap.add_argument("--stages", help="comma-separated stages to time alone (e.g. features,heatmaps); needs --erm-cache")
    ap.add_argument("--erm-cache", type=Path, help="--stages: where ERM is trained once and reused")
    ap.add_argument("--repeats", type=int, default=3, help="--stages: fresh computations of those stages")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    spec = load_spec(args.spec, args.sets)
    if args.stages:
        if args.erm_cache is None:
            ap.error("--stages needs --erm-cache (a folder: ERM is trained there once, then reused)")
        stage_figures(spec, args.stages.split(","), args.erm_cache, args.repeats)
        return
    core_figures(spec)
    if not args.core_only:
        pipeline_figures(spec)


if __name__ == "__main__":
    main()
