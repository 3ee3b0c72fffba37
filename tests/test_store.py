import json
import multiprocessing
import os

import numpy as np
import pytest

from exmap_ray.cache import StageCache
from exmap_ray.storage import atomic_path, save_npy, write_json


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "a.json"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk gone")
    assert list(tmp_path.iterdir()) == []
    write_json(target, {"x": np.float32(1.5), "n": np.int64(3)})
    assert json.loads(target.read_text()) == {"x": 1.5, "n": 3}
    save_npy(tmp_path / "z.npy", np.arange(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "z.npy"]


def test_stage_cache_computes_once_and_records(tmp_path):
    cache = StageCache(tmp_path)
    calls = []

    def compute(d):
        calls.append(d)
        (d / "out.txt").write_text("x")
        return {"value": 7}

    a = cache.stage("erm", {"lr": 1})
    assert cache.run(a, compute)["value"] == 7
    assert cache.run(a, compute)["value"] == 7
    assert len(calls) == 1
    b = cache.stage("heatmaps", {"m": "lrp"}, (a,))
    assert b.key != cache.stage("heatmaps", {"m": "lrp"}, (cache.stage("erm", {"lr": 2}),)).key
    assert [(r["stage"], r["event"]) for r in cache.records()] == [("erm", "computed"), ("erm", "reused")]


def test_unfinished_stage_is_cleared_not_trusted(tmp_path):
    cache = StageCache(tmp_path)
    st = cache.stage("heatmaps", {})
    st.dir.mkdir(parents=True)
    (st.dir / "shard-00000.npy").write_text("half-written")  # a crash before `done`

    def boom(d):
        raise OSError("No space left on device")

    with pytest.raises(OSError):
        cache.run(st, boom)
    assert not st.done
    info = cache.run(st, lambda d: {"ok": True})
    assert info["ok"] and not (st.dir / "shard-00000.npy").exists()


def _claimant(root, marker_dir, arrived):
    """A process that needs the stage: it signals `arrived` at the claim (past the `done` check, before
    it takes the lock); whichever computes holds the lock until both have arrived, so the other is
    then waiting on the lock, not merely racing it."""
    from exmap_ray.claims import FileClaims
    from exmap_ray.storage import Loc
    from exmap_ray.cache import StageCache as _SC

    class Arriving:
        def __init__(self, inner):
            self.inner = inner

        def hold(self, stage):
            arrived.release()
            return self.inner.hold(stage)

    cache = _SC(root, claims=Arriving(FileClaims(Loc.parse(root))))
    st = cache.stage("heatmaps", {"m": "lrp"})

    def compute(d):
        (marker_dir / f"computed-{os.getpid()}").write_text("x")
        for _ in range(2):  # this claimant and the other one
            assert arrived.acquire(timeout=60), "the other claimant never reached the claim"
        (d / "shard-00000.npy").write_text("data")
        return {}

    cache.run(st, compute)


def test_two_processes_needing_the_same_stage_compute_it_once(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    arrived = ctx.Semaphore(0)
    procs = [ctx.Process(target=_claimant, args=(tmp_path / "cache", tmp_path, arrived)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    assert len(list(tmp_path.glob("computed-*"))) == 1
    events = sorted(r["event"] for r in StageCache(tmp_path / "cache").records())
    assert events == ["computed", "reused"]
