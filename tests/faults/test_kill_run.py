"""Fault 4 for `exmap-ray run`: the whole process group is SIGKILLed mid-stage (while heatmaps are
being written), then started again with the same spec and --resume. Finished stages are reused
(asserted through the cache's record), the half-written stage is never taken as done, and the
interrupted MLflow run is marked KILLED. (The same fault for `exmap-ray tune` is in tests/test_tune.py.)"""

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml
from mlflow.tracking import MlflowClient

from exmap_ray.cli import main
from exmap_ray.cache import StageCache

from ..conftest import kill_session, tiny_spec_dict


def test_run_killed_mid_stage_resumes(tiny_run, tmp_path, capsys, caplog):
    spec = tmp_path / "tiny.yaml"
    # the heatmap keys changed here only set how the stage runs (small shards, one actor), not its hash
    spec.write_text(yaml.safe_dump(tiny_spec_dict(heatmaps={"shard_size": 20, "num_actors": 1, "batch_size": 10})))
    out = tmp_path / "run"
    erm = Path(tiny_run[1]["cache"]["erm"]["dir"])  # the tiny ERM, finished: the run starts after it
    shutil.copytree(erm, out / "cache" / erm.name)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "TQDM_DISABLE": "1"}
    cmd = [sys.executable, "-m", "exmap_ray", "run", str(spec), "--out", str(out), "--quiet"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    cache = out / "cache"
    deadline, hm = time.time() + 300, []
    try:
        while time.time() < deadline and not hm:
            assert proc.poll() is None, "the run ended before it could be interrupted"
            hm = [d for d in cache.glob("heatmaps-*") if list(d.glob("shard-*.npy"))] if cache.exists() else []
            time.sleep(0.02)
    finally:
        kill_session(proc)  # the driver, its Ray, its actors: everything at once
    assert hm, "heatmap extraction never started"
    assert not (hm[0] / "done").exists()  # killed mid-stage: shards on disk, the stage not done
    before = [(r["stage"], r["event"]) for r in StageCache(cache).records()]
    assert ("erm", "reused") in before and ("features", "computed") in before
    assert ("heatmaps", "computed") not in before

    # --resume with another spec is refused before any work
    assert main(["run", str(spec), "--out", str(out), "--resume", "--set", "seed=1"]) == 2
    assert "differs in seed" in capsys.readouterr().err

    # the resume runs in this process, on the session's Ray: what is under test is the cache's state
    # after the kill, which a fresh driver sees the same way (and a fresh local Ray would cost ~20 s here)
    caplog.set_level(logging.WARNING, logger="exmap_ray")
    assert main(cmd[3:] + ["--resume"]) == 0, capsys.readouterr().err[-3000:]
    after = [(r_["stage"], r_["event"]) for r_ in StageCache(cache).records()]
    assert after[: len(before)] == before
    new = after[len(before) :]
    assert ("erm", "reused") in new and ("features", "reused") in new  # finished stages: not recomputed
    assert ("erm", "computed") not in after and after.count(("features", "computed")) == 1
    assert ("heatmaps", "computed") in new  # the half-written one: cleared and redone
    assert any("clearing unfinished attempt" in m for m in caplog.messages)
    assert json.loads((out / "results.json").read_text())["robust"]["n_groups"] >= 2

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert sorted(x.info.status for x in runs) == ["FINISHED", "KILLED"]
