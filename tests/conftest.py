"""Shared fixtures: a real local Ray, a tiny spec, and tiny on-disk datasets.

Everything here is real (Ray, MLflow on SQLite, FAISS, timm); tests stay fast
through tiny data and the 370k-parameter `test_resnet`, not through fakes.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import os
import json
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # no token notice on every test start
os.environ.setdefault("TQDM_DISABLE", "1")
# Fault plans (exmap_ray/faults.py): Ray's workers inherit this path when the session's Ray starts;
# a test arms a fault by writing the file (fixture `fault_plan`) and disarms it by removing it.
FAULT_DIR = Path(tempfile.mkdtemp(prefix="exmap-faults-"))
os.environ["EXMAP_RAY_FAULTS"] = str(FAULT_DIR / "plan.json")
# a dead MLflow server (the outage tests) is noticed at the first refused connection, not after
# retries with backoff; set before Ray starts, so trial processes see it too
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
# Ray's per-node background work, made lighter for a suite that starts many Ray nodes on 2 cores (set
# before any Ray starts; its nodes, the CLI's and the cluster test's inherit it): the dashboard agent
# samples every process's stats every 5 s by default (a minute here), and the log monitor looks for
# new log files every 0.1 s (every 0.5 s here)
os.environ.setdefault("REPORTER_UPDATE_INTERVAL_MS", "60000")
os.environ.setdefault("RAY_LOG_MONITOR_MANY_FILES_THRESHOLD", "0")
# `dataset.decode_cache: auto` decodes on-disk val/test images into this session's folder, not under ~/.cache
os.environ.setdefault("EXMAP_RAY_DECODE_CACHE", tempfile.mkdtemp(prefix="exmap-decoded-"))


@pytest.fixture(scope="session")
def ray_local():
    import ray

    from exmap_ray.cli import local_ray_defaults

    if not ray.is_initialized():
        local_ray_defaults()  # as `exmap-ray run` does for the Ray it starts
        # with its dashboard, though nothing here reads it: Ray Train's PlacementGroupCleaner queries the
        # controller's state through it, and without it logs a failure every few seconds
        ray.init(num_cpus=2, logging_level=logging.WARNING)
    yield ray
    ray.shutdown()


@pytest.fixture
def fault_plan():
    """arm(list_of_faults) writes the session's fault plan; it is removed, with its hit counts, afterwards."""
    plan = Path(os.environ["EXMAP_RAY_FAULTS"])

    def arm(faults: list[dict]) -> Path:
        plan.write_text(json.dumps(faults))
        return plan

    yield arm
    for f in plan.parent.glob(plan.name + "*"):
        f.unlink()


def tiny_spec_dict(**over) -> dict:
    d = {
        "name": "tiny",
        "seed": 0,
        "dataset": {"name": "cmnist", "rho": 0.95, "n_train": 400, "n_val": 300, "n_test": 300},
        "model": {"backbone": "test_resnet"},
        "erm": {"epochs": 1, "batch_size": 64},
        # one extraction actor: each actor is a process importing torch, far longer than its 300 images take
        # (num_actors is not hashed: the stage keys are those of any actor count)
        "heatmaps": {"method": "lrp", "downsize": 7, "shard_size": 100, "num_actors": 1, "batch_size": 64},
        "clustering": {"method": "spectral", "k": "auto", "scope": "global"},
        "retrain": {"n_select_repeats": 2, "dfr": {"c_grid": [1.0, 0.1], "n_final_fits": 3}},
        # one thread per ERM worker and heatmap actor: the same numbers on any machine or cluster shape
        # (tests/cluster/tiny.yaml is this spec, and its cluster run must equal `tiny_run` exactly)
        "resources": {"worker_cpus": 1},
    }
    for k, v in over.items():
        if k == "dataset" and v.get("name", d["dataset"]["name"]) != d["dataset"]["name"]:
            d[k] = v  # another dataset: the tiny C-MNIST's own keys (rho, n_train, ...) are not its keys
        else:
            d[k] = {**d.get(k, {}), **v} if isinstance(v, dict) else v
    return d


@pytest.fixture(scope="session")
def tiny_run(ray_local, tmp_path_factory):
    """The tiny spec run once from scratch in this session: (OUT, results). Tests that only need its
    upstream pass `OUT / "cache"` as their cache, so the tiny ERM is trained once, not per test."""
    from exmap_ray.pipeline import run_pipeline
    from exmap_ray.spec import from_dict

    out = tmp_path_factory.mktemp("tiny_run")
    return out, run_pipeline(from_dict(tiny_spec_dict()), out)


@pytest.fixture
def tiny_spec():
    from exmap_ray.spec import from_dict

    return from_dict(tiny_spec_dict())


def make_folder_dataset(
    root: Path, per_group: int = 6, size: int = 32, seed: int = 0, spurious_col: str = "place"
) -> Path:
    """A group_DRO-layout dataset of real PNGs: class = shape (square / bar), spurious = background tint."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for split in (0, 1, 2):
        for y in (0, 1):
            for s in (0, 1):
                for i in range(per_group):
                    img = np.zeros((size, size, 3), np.uint8)
                    img[..., 2 if s else 0] = 80 + rng.integers(0, 40)
                    if y:
                        img[size // 4 : 3 * size // 4, size // 2 - 2 : size // 2 + 2] = 255
                    else:
                        img[size // 3 : 2 * size // 3, size // 3 : 2 * size // 3] = 255
                    name = f"imgs/s{split}_y{y}_p{s}_{i}.png"
                    (root / "imgs").mkdir(exist_ok=True)
                    Image.fromarray(img).save(root / name)
                    rows.append({"img_filename": name, "y": y, "split": split, spurious_col: s})
    with open(root / "metadata.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["img_filename", "y", "split", spurious_col])
        w.writeheader()
        w.writerows(rows)
    return root


@pytest.fixture
def folder_dataset(tmp_path) -> Path:
    return make_folder_dataset(tmp_path / "waterbirds_like")


# ---------------------------------------------------------------- two pytest processes (`make test`)
# Under pytest-xdist, the multi-node cluster starts alone: a starting worker raylet has a fixed window to
# register with the head, which a 2-core machine busy with the other process's tests can make it miss
# (seen: "only 1 of 2 Ray nodes came up within 300 s"). The cluster fixture holds an exclusive lock
# (`machine_to_itself`) while its nodes start; every other test holds it shared. A second lock, held
# exclusively while the cluster waits, stops new tests from starting meanwhile. The jobs on the cluster
# then run beside the other process's tests. flock locks go with their process: a crash leaves none held.
def _xdist_locks() -> tuple[Path, Path] | None:
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if not os.environ.get("PYTEST_XDIST_WORKER") or not run:
        return None
    base = Path(tempfile.gettempdir()) / f"exmap-ray-pytest-{run}"
    base.mkdir(exist_ok=True)
    return base / "intent.lock", base / "machine.lock"


@contextlib.contextmanager
def _machine_lock(exclusive: bool):
    locks = _xdist_locks()
    if locks is None:
        yield
        return
    import fcntl

    mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
    with open(locks[0], "a") as intent, open(locks[1], "a") as machine:
        fcntl.flock(intent, mode)  # shared: waits while the cluster is in line for the machine
        fcntl.flock(machine, mode)
        fcntl.flock(intent, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(machine, fcntl.LOCK_UN)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    if item.get_closest_marker("cluster"):
        yield
        return
    with _machine_lock(exclusive=False):
        yield


_XDIST_RUNS: set[str] = set()


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    """pytest-xdist, in the controller: note the run's id, whose lock folder the workers will make."""
    _XDIST_RUNS.add(node.workerinput["testrunuid"])


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    """In the controller, once every worker has finished: remove this run's lock folder (and only it)."""
    import shutil

    for run in _XDIST_RUNS:
        shutil.rmtree(Path(tempfile.gettempdir()) / f"exmap-ray-pytest-{run}", ignore_errors=True)


def machine_to_itself():
    """A context in which no other test runs (under pytest-xdist; nothing in one process). It waits for
    the test the other process is running to end."""
    return _machine_lock(exclusive=True)


def kill_session(proc: subprocess.Popen, timeout: float = 60) -> None:
    """SIGKILL a subprocess started with `start_new_session=True` and every live process of its session,
    and wait until none is left. `os.killpg` alone misses Ray's actors: each runs in its own process
    group (in the same session) and lives on for seconds after its raylet is gone, still able to write
    (an MLflow run started after a resume had already marked the dead trials KILLED, seen under load)."""
    from .cluster.local_cluster import proc_stats

    sid = proc.pid
    os.killpg(sid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + timeout
    while True:
        left = [pid for pid, (state, _, _, session) in proc_stats().items() if session == sid and state != "Z"]
        if not left:
            return
        if time.time() > deadline:
            raise AssertionError(f"processes of the killed session {sid} still alive after {timeout} s: {left}")
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)


def pytest_collection_modifyitems(config, items):
    """Tests marked `slow` (heavier variants) run only on demand: `pytest -m slow`, or with the others
    via `make test PYTEST_ARGS='-m "slow or not slow"'`. By default they are reported as skipped."""
    if "slow" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="heavier variant, run on demand: pytest -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
