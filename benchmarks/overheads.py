"""Where the wall time of `exmap-ray run` and of a sweep's trial goes, beyond the stages' own work.

    nice -n 10 .venv/bin/python benchmarks/overheads.py demo              # exmap-ray run cmnist, fresh cache
    nice -n 10 .venv/bin/python benchmarks/overheads.py sweep --trials 6  # cmnist_sweep, one trial at a time

**demo**: `exmap-ray run cmnist` through the CLI's own `main`, in this process, on a fresh cache and
output folder: imports (the CLI and everything it loads before it reads the spec), Ray's start (`ray.init`,
timed where the CLI calls it), each stage and the retraining rows (the run's own `timings_s`), and the rest
(preflight, MLflow set-up and logging, figures, Ray's shutdown). "imports" is the CLI and the libraries
every run loads (torch, timm, Ray, MLflow), imported first; a run's lazy imports of other modules fall in
the stage or part that makes them. Further arguments go to the CLI (`--set erm.epochs=2`).

**sweep**: `exmap-ray tune cmnist_sweep` with `max_concurrent_trials: 1` and the first `--trials` points of
its grid, on a shared upstream computed first (not counted). Per trial, from its MLflow run's start and end
and its `results.json`: its stages (`timings_s`), its MLflow run beyond them (parameters, metrics,
artifacts, figures), and the gap from its run's end to the next trial's run start (Tune and Ray:
reporting, scheduling, the trial actor's set-up before its run, the done record). The overhead of a trial
is its wall time (one run start to the next) less its stages; the median is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def timed_ray_init(record: dict):
    import ray

    real = ray.init

    def init(*a, **kw):
        t = time.perf_counter()
        try:
            return real(*a, **kw)
        finally:
            record["ray_init_s"] = record.get("ray_init_s", 0.0) + time.perf_counter() - t

    ray.init = init


def demo(args, t_start: float) -> None:
    # the imports every run makes, whether at load or inside main: the CLI, its plugins, and the libraries
    import mlflow  # noqa: F401
    import ray  # noqa: F401
    import timm  # noqa: F401
    import torch  # noqa: F401

    from exmap_ray import plugins  # noqa: F401
    from exmap_ray.cli import main as cli

    imports = time.perf_counter() - t_start
    record: dict = {}
    timed_ray_init(record)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        t = time.perf_counter()
        rc = cli(["run", "cmnist", "--out", str(out), "--cache", str(Path(tmp) / "cache"), "--quiet", *args.extra])
        wall = time.perf_counter() - t
        res = json.loads((out / "results.json").read_text())
    assert rc == 0, rc
    stages = res["timings_s"]
    total = imports + wall
    rest = wall - record.get("ray_init_s", 0.0) - sum(stages.values())
    print(f"exmap-ray run cmnist (fresh cache), load average at the end {os.getloadavg()[0]:.1f}\n")
    print("| part | seconds | share |\n|---|---|---|")
    parts = {"imports": imports, "Ray start (ray.init)": record.get("ray_init_s", 0.0), **stages, "the rest": rest}
    for k, v in parts.items():
        print(f"| {k} | {v:.1f} | {v / total:.0%} |")
    print(f"| **total (process start to exit of main)** | **{total:.1f}** | |")


def sweep(args) -> None:
    import yaml
    from mlflow.tracking import MlflowClient

    from exmap_ray.cli import main as cli
    from exmap_ray.spec import SHIPPED

    d = yaml.safe_load((SHIPPED / "cmnist_sweep.yaml").read_text())
    d["base"] = str(SHIPPED / d["base"])
    d["search"]["max_concurrent_trials"] = 1
    d["search"]["space"] = {"clustering.k": {"grid": [2, 3, 4, 6, 8, "auto"][: args.trials]}}
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "sweep.yaml"
        spec.write_text(yaml.safe_dump(d))
        out, cache = Path(tmp) / "sweep", Path(args.cache or Path(tmp) / "cache")
        # the shared upstream first (ERM, features, heatmaps), so the sweep's trials are all that is timed
        warm = ["run", "cmnist", "--out", str(Path(tmp) / "warm"), "--cache", str(cache), "--quiet", *args.extra]
        assert cli(warm) == 0
        t = time.perf_counter()
        assert cli(["tune", str(spec), "--out", str(out), "--cache", str(cache), "--quiet", *args.extra]) == 0
        wall = time.perf_counter() - t
        summary = json.loads((out / "summary.json").read_text())
        client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
        parent = summary["mlflow_parent_run_id"]
        exp = client.get_run(parent).info.experiment_id
        kids = sorted(
            client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent}'"), key=lambda r: r.info.start_time
        )
        rows = []
        for i, k in enumerate(kids):
            res = json.loads((out / "trials" / k.info.run_name / "results.json").read_text())
            stages = sum(res["timings_s"].values())
            run_s = (k.info.end_time - k.info.start_time) / 1000
            nxt = kids[i + 1].info.start_time / 1000 if i + 1 < len(kids) else None
            gap = nxt - k.info.end_time / 1000 if nxt else None
            rows.append({"trial": k.info.run_name, "stages": stages, "mlflow_beyond": run_s - stages, "gap": gap})
    print(
        f"exmap-ray tune: {len(rows)} trials one at a time (clustering.k), shared upstream cached; sweep wall "
        f"{wall:.1f} s (its own timings: {json.dumps({k: round(v, 1) for k, v in summary['timings_s'].items()})}); "
        f"load average at the end {os.getloadavg()[0]:.1f}\n"
    )
    print("| trial | its stages (s) | its MLflow run beyond them (s) | to the next trial's run (s) |")
    print("|---|---|---|---|")
    for r in rows:
        gap = f"{r['gap']:.2f}" if r["gap"] is not None else "-"
        print(f"| {r['trial']} | {r['stages']:.2f} | {r['mlflow_beyond']:.2f} | {gap} |")
    over = [r["mlflow_beyond"] + r["gap"] for r in rows if r["gap"] is not None]
    if over:
        print(
            f"\nmedian overhead per trial beyond its stages: {statistics.median(over):.2f} s "
            f"(MLflow run beyond the stages {statistics.median(r['mlflow_beyond'] for r in rows):.2f} s, "
            f"Tune/Ray between runs {statistics.median(r['gap'] for r in rows if r['gap'] is not None):.2f} s)"
        )


if __name__ == "__main__":
    t_start = time.perf_counter()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["demo", "sweep"])
    ap.add_argument("--trials", type=int, default=6, help="sweep: grid points of clustering.k (2..6)")
    ap.add_argument("--cache", help="sweep: a stage cache to reuse for the shared upstream")
    a, a.extra = ap.parse_known_args()  # the rest goes to the CLI, e.g. --set erm.epochs=2
    demo(a, t_start) if a.what == "demo" else sweep(a)
