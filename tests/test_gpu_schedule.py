"""The GPU schedule, proven on a machine without a GPU: Ray's logical GPUs, the torch side on the CPU.

Ray accepts logical GPUs (`ray.init(num_gpus=N)`); the test-only EXMAP_RAY_FAKE_CUDA=1 (read in
`resources.fake_cuda` alone, docs/gpu.md) makes each GPU stage compute with torch on the CPU while it
keeps the GPU Ray assigned it. What is checked is where each stage runs and what it holds: every GPU
stage in a process Ray gave a GPU (never the driver), actors sharing a GPU, sweeps whose trials hold
GPU shares finishing every trial, and the autoscaler request withdrawn. Each class runs on its own
local Ray with logical GPUs; the session's Ray (2 CPUs, no GPU) is started again afterwards.
"""

from __future__ import annotations

import _thread
import contextlib
import json
import logging
import os
import threading

import numpy as np
import pytest

from exmap_ray.cache import StageCache
from exmap_ray.data import build_dataset
from exmap_ray.resources import FAKE_CUDA_ENV
from exmap_ray.spec import from_dict
from exmap_ray.storage import read_json

from .conftest import tiny_spec_dict

SWEEP_TIMEOUT_S = 420  # a sweep that waits for ever on a GPU is interrupted (and fails) after this


@contextlib.contextmanager
def logical_gpus(n: int):
    """A local Ray with `n` logical GPUs whose processes run GPU stages' torch on the CPU."""
    import ray

    from exmap_ray.cli import local_ray_defaults

    had = ray.is_initialized()
    if had:
        ray.shutdown()
    os.environ[FAKE_CUDA_ENV] = "1"  # before ray.init: its raylet, so every worker, inherits it
    local_ray_defaults()
    ray.init(num_cpus=4, num_gpus=n, logging_level=logging.WARNING)
    try:
        yield ray
    finally:
        ray.shutdown()
        os.environ.pop(FAKE_CUDA_ENV, None)
        if had:  # the session's Ray, as conftest.ray_local starts it
            ray.init(num_cpus=2, logging_level=logging.WARNING)


@pytest.fixture(scope="module")
def gpu_cache(tmp_path_factory):
    """One stage cache for the module: ERM (under the cuda key) is trained once and reused."""
    return tmp_path_factory.mktemp("gpu_cache")


@pytest.fixture(scope="class")
def one_gpu():
    with logical_gpus(1) as ray:
        yield ray


@pytest.fixture(scope="class")
def two_gpus():
    with logical_gpus(2) as ray:
        yield ray


def gpu_spec(**over):
    d = tiny_spec_dict(**over)
    d["resources"] = {**d["resources"], "gpu": True}
    return from_dict(d)


def on_its_gpu(p: dict, gpus: int) -> None:
    """A stage's placement: a Ray worker (not this driver) holding one of the `gpus` logical GPUs."""
    assert p["ray_worker"] and p["pid"] != os.getpid(), p
    assert len(p["gpu_ids"]) == 1 and int(p["gpu_ids"][0]) < gpus, p
    assert p["device"] == "cpu" and p["fake_cuda"], p  # the torch side on the CPU, by EXMAP_RAY_FAKE_CUDA


def autoscaler_request() -> list:
    """The resource request the autoscaler sees (the GCS key the v1 SDK writes; v2's constraint)."""
    import ray
    from ray.autoscaler.v2.utils import is_autoscaler_v2

    if is_autoscaler_v2():
        from ray.autoscaler.v2.sdk import get_cluster_status

        status = get_cluster_status(ray.get_runtime_context().gcs_address)
        return [d.bundles_by_count for d in status.resource_demands.cluster_constraint_demand]
    from ray.autoscaler._private.constants import AUTOSCALER_RESOURCE_REQUEST_CHANNEL
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get(AUTOSCALER_RESOURCE_REQUEST_CHANNEL)
    return json.loads(raw) if raw else []


@contextlib.contextmanager
def deadline(seconds: float, what: str):
    """Interrupt the main thread after `seconds`: a schedule that waits for ever fails instead of hanging."""
    fired = threading.Event()

    def fire():
        fired.set()
        _thread.interrupt_main()

    timer = threading.Timer(seconds, fire)
    timer.start()
    try:
        yield
    except KeyboardInterrupt:
        if fired.is_set():
            pytest.fail(f"{what} did not finish within {seconds:g} s: a stage waits for a GPU it cannot get")
        raise
    finally:
        timer.cancel()


class TestOneGPU:
    def test_a_task_given_no_gpu_sees_them_all_so_the_device_comes_from_ray(self, one_gpu):
        """Ray 2.60 leaves CUDA_VISIBLE_DEVICES as it was in a task given 0 GPUs (as a trial with
        search.trial_gpus 0 is): such a process would see every GPU of its node. The rule refuses a GPU
        stage there; a task holding a share gets Ray's GPU id."""
        import ray

        def _visible_and_device(spec_dict: dict):  # nested: pickled by value, whatever the workers' path
            from exmap_ray.resources import gpu_ids, run_task, stage_device
            from exmap_ray.spec import from_dict

            spec = from_dict(spec_dict)
            try:
                device = stage_device(spec)
            except RuntimeError as e:
                device = f"RuntimeError: {e}"
            # where a GPU stage called from here runs: here on a held share, else a task with its own GPU
            stage_pid, stage_ids = run_task(spec, lambda: (os.getpid(), gpu_ids()))
            here = stage_pid == os.getpid()
            return os.environ.get("CUDA_VISIBLE_DEVICES"), gpu_ids(), device, here, stage_ids

        spec = gpu_spec().to_dict()
        zero, half = (ray.remote(num_cpus=0.1, num_gpus=g)(_visible_and_device) for g in (0, 0.5))
        visible, ids, device, here, stage_ids = ray.get(zero.remote(spec))
        assert visible == os.environ.get("CUDA_VISIBLE_DEVICES") and ids == [], visible  # not blanked
        assert device.startswith("RuntimeError") and "assigned no GPU" in device
        assert not here and stage_ids == ["0"]  # from a 0-GPU process: a task holding the GPU
        # a share held (a trial with trial_gpus 0.5): its GPU, and its GPU stages run on it, in-process
        assert ray.get(half.remote(spec)) == ("0", ["0"], "cpu", True, ["0"])

    def test_two_heatmap_actors_share_the_one_gpu(self, one_gpu, gpu_cache):
        """heatmaps.actors_per_gpu 2: the stage's own actor options put both of its actors on the one GPU at
        once (with a whole GPU each, the second could never start: the wait below would time out)."""
        import ray

        from exmap_ray.heatmaps.extract import HeatmapWorker, actor_options
        from exmap_ray.models import create_model, save_checkpoint

        spec = gpu_spec(heatmaps={"num_actors": None, "actors_per_gpu": 2})
        n, options, threads = actor_options(spec, n_shards=6)
        assert n == 2 and options["num_gpus"] == 0.5
        ckpt = gpu_cache / "untrained.pt"
        save_checkpoint(create_model(spec.model.backbone, 2), ckpt)
        Worker = ray.remote(HeatmapWorker).options(**options)
        out = str(gpu_cache / "unused")
        actors = [Worker.remote(spec.to_dict(), str(ckpt), out, threads) for _ in range(n)]
        try:
            ready, pending = ray.wait([a.ready.remote() for a in actors], num_returns=n, timeout=300)
            assert not pending, "the second actor never started: the two do not fit on one GPU"
            placements = ray.get(ready)
        finally:
            for a in actors:
                ray.kill(a)
        for p in placements:
            on_its_gpu(p, 1)
        assert len({p["pid"] for p in placements}) == 2

    def test_autoscaler_request_withdrawn_when_the_job_ends_and_when_it_fails(self, one_gpu, caplog):
        """resources.gpu auto with 2 ERM workers on a 1-GPU cluster asks the autoscaler for 2 GPUs; leaving
        the CLI's Ray session withdraws the request, whether the job finished or raised."""
        from exmap_ray.cli import ray_session
        from exmap_ray.resources import resolve_resources

        spec = from_dict(tiny_spec_dict(erm={"num_workers": 2}, resources={"autoscale_wait_s": 0.5}))
        with ray_session(None):
            assert resolve_resources(spec).resources.gpu is True  # 1 of 2 joined: use it, say so
            assert autoscaler_request() == [{"GPU": 1}, {"GPU": 1}]
        assert autoscaler_request() == []
        assert "1 of 2 GPU(s)" in caplog.text
        with pytest.raises(RuntimeError, match="the job failed"):
            with ray_session(None):
                resolve_resources(spec)
                assert len(autoscaler_request()) == 2
                raise RuntimeError("the job failed")
        assert autoscaler_request() == []

    @pytest.mark.parametrize("trial_gpus", [0.5, 1])
    def test_sweep_with_trials_holding_the_gpu_finishes(self, one_gpu, gpu_cache, tmp_path, trial_gpus):
        """The first sweep's driver computes the shared upstream (this module's only ERM): every GPU stage
        of it holds Ray's GPU 0, none runs in the driver, and two heatmap actors share the GPU and compute
        what the spec's method computes. In the second, each trial holds the only GPU and computes its
        heatmaps (heatmaps.downsize searched) and clusters on it."""
        space = {"clustering.k": {"grid": [2, 3] if trial_gpus == 1 else [4, 5]}}
        if trial_gpus == 1:  # the heatmaps inside the trials too, with the only GPU held by the trial
            space["heatmaps.downsize"] = {"grid": [5]}
        out = check_sweep(tmp_path, gpu_cache, space, trial_gpus, gpus=1)
        if trial_gpus == 0.5:
            check_upstream(out, gpu_cache)


class TestTwoGPUs:
    @pytest.mark.parametrize("trial_gpus", [1, 0.5])
    def test_sweep_with_trials_holding_the_gpus_finishes(self, two_gpus, gpu_cache, tmp_path, trial_gpus):
        space = {"clustering.k": {"grid": [6, 7] if trial_gpus == 1 else [8, 9]}}
        check_sweep(tmp_path, gpu_cache, space, trial_gpus, gpus=2)


def check_sweep(tmp_path, cache, space: dict, trial_gpus: float, gpus: int):
    """Two trials at most at once, each holding `trial_gpus`: every trial finishes, and each GPU stage a
    trial computed ran in the trial's own process on the trial's share (not as a task asking for more).
    Returns the sweep's folder."""
    import time

    from exmap_ray.tune import run_sweep

    # two heatmap actors sharing a GPU wherever the driver extracts (an execution-only key)
    spec = gpu_spec(
        search={"space": space, "trial_gpus": trial_gpus, "max_concurrent_trials": 2},
        heatmaps={"num_actors": None, "actors_per_gpu": 2, "shard_size": 50},
    )
    t0 = time.time()
    with deadline(SWEEP_TIMEOUT_S, f"a sweep with trial_gpus {trial_gpus} on {gpus} GPU(s)"):
        summary = run_sweep(spec, tmp_path / "sweep", cache)
    assert summary["n_trials"] == 2 and summary["n_failed"] == 0, summary
    computed = {
        (r["stage"], r["key"]): r["pid"]
        for r in StageCache(cache).records()
        if r["event"] == "computed" and r["time"] >= t0
    }
    seen = set()
    for row in summary["rows"]:
        res = read_json(tmp_path / "sweep" / "trials" / row["trial"] / "results.json")
        for name in ("clusters", "heatmaps"):
            stage = res["cache"][name]
            info = read_json(os.path.join(stage["dir"], "done"))
            by = computed.get((name, os.path.basename(stage["dir"]).split("-", 1)[1]))
            if by is None or (name == "heatmaps" and "heatmaps.downsize" not in space):
                continue  # the other trial's (claims: computed once), or the driver's shared stage
            placement = info["placements"][0] if name == "heatmaps" else info["placement"]
            on_its_gpu(placement, gpus)
            assert placement["pid"] == by, (name, placement, by)  # computed in the trial itself
            if name == "heatmaps":
                assert info["actors"] == 0
            seen.add(name)
    assert "clusters" in seen and ("heatmaps" in seen) == ("heatmaps.downsize" in space), seen
    return tmp_path / "sweep"


def check_upstream(out, cache) -> None:
    """The stages the sweep's driver computed before its trials: ERM's worker, the features task and two
    heatmap actors sharing the one GPU, each holding Ray's GPU 0; the actors' maps are the method's."""
    from exmap_ray.heatmaps import HEATMAP_METHODS
    from exmap_ray.heatmaps.extract import HeatmapShards, extract
    from exmap_ray.models import load_checkpoint

    trial = next((out / "trials").iterdir())
    res = read_json(trial / "results.json")
    info = {name: read_json(os.path.join(c["dir"], "done")) for name, c in res["cache"].items()}
    assert info["erm"]["use_gpu"]
    env = info["erm"]["environment"]
    on_its_gpu(env["placement"], 1)
    assert env["backend"] == "gloo" and env["gpu"] is None  # no CUDA device was really used
    on_its_gpu(info["features"]["placement"], 1)
    hm = info["heatmaps"]
    # two actors planned (actors_per_gpu 2 on 1 GPU); one may have done every shard before the other was up
    assert hm["actors"] == 2 and hm["device"] == "cuda" and hm["placements"], hm
    for p in hm["placements"]:
        on_its_gpu(p, 1)
    spec = from_dict(res["config"])
    data = build_dataset(spec.dataset, spec.seed)
    erm_model = os.path.join(res["cache"]["erm"]["dir"], "model.pt")
    model = load_checkpoint(spec.model.backbone, data.n_classes, erm_model)
    want, _, _, _ = extract(HEATMAP_METHODS.get("lrp")(model, spec.heatmaps), data.val.images, 64, 7)
    got = HeatmapShards(res["cache"]["heatmaps"]["dir"]).load()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)
