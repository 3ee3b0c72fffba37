"""Fault: the MLflow tracking server is unreachable, at the start of a run or in the middle of it.

Real processes only: the `exmap-ray` CLI (in a subprocess with its own local Ray where it must stop
at once; in this process, on the session's Ray, where it runs to the end), a real `mlflow server` on
SQLite that the test SIGKILLs mid-run and restarts, and `sync-mlflow`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from exmap_ray.cli import main
from exmap_ray.cache import StageCache

from ..conftest import tiny_spec_dict

ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
ARTIFACTS = {"results.json", "spec.resolved.json", "group_accuracy.png", "heatmaps_by_pseudo_group.png"}


def _free_port() -> int:
    """A port nothing listens on (bound and released at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spec(tmp_path: Path) -> Path:
    p = tmp_path / "spec.yaml"
    p.write_text(yaml.safe_dump(tiny_spec_dict()))
    return p


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "exmap_ray", *args]


class MlflowServer:
    """`mlflow server` on a SQLite db in its own process group, so a SIGKILL takes all its workers."""

    def __init__(self, root: Path, port: int):
        self.root, self.port = root, port
        self.uri = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 180.0) -> "MlflowServer":
        mlflow_exe = Path(sys.executable).with_name("mlflow")
        cmd = [
            str(mlflow_exe) if mlflow_exe.exists() else "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{self.root / 'server.db'}",
            "--artifacts-destination",
            str(self.root / "server-artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]
        log = open(self.root / f"server-{time.time():.0f}.log", "w")
        # no job-execution workers: MLflow 3 starts seven huey consumers for its GenAI jobs by default,
        # a few % of a core each while idle, which exmap-ray never uses
        self.proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.root,
            env={**ENV, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
            start_new_session=True,
        )
        t0 = time.time()
        while time.time() - t0 < timeout:
            assert self.proc.poll() is None, f"mlflow server exited: {Path(log.name).read_text()[-2000:]}"
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        raise AssertionError(f"mlflow server did not answer /health in {timeout} s")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=30)


def _kill_when(server: MlflowServer, ready, poll: float = 0.05, timeout: float = 300):
    """A thread that SIGKILLs the server as soon as ready() is true (an OSError or ValueError from it, a
    file not yet there or half written, counts as not yet); returns the thread and its `killed` event."""
    killed = threading.Event()

    def watch():
        t0 = time.time()
        while time.time() - t0 < timeout and not killed.is_set():
            try:
                if ready():
                    server.kill()
                    killed.set()
            except (OSError, ValueError):
                pass
            time.sleep(poll)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread, killed


@pytest.mark.parametrize("command", ["run", "tune"])
def test_unreachable_server_at_start_stops_at_once(tmp_path, command):
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    out = tmp_path / "out"
    extra = ["--set", "search.space={clustering.k: {grid: [2, 3]}}"] if command == "tune" else []
    # "at once" is asserted by what did not happen (no stage work, below); a hang fails by the timeout.
    # A wall-clock bound would flake on a loaded machine.
    p = subprocess.run(
        _cli(command, str(_spec(tmp_path)), "--out", str(out), "--tracking-uri", uri, *extra),
        capture_output=True,
        text=True,
        env=ENV,
        timeout=120,
    )
    assert p.returncode == 2, p.stderr
    assert uri in p.stderr and "unreachable" in p.stderr
    assert f"sqlite:///{out.resolve() / 'mlflow.db'}" in p.stderr  # the local default, for this OUT
    assert "Traceback" not in p.stderr
    assert not (out / "cache").exists() and not list(tmp_path.rglob("erm-*"))  # no stage work at all


def test_sync_mlflow_rejects_a_folder_without_results(tmp_path, capsys):
    assert main(["sync-mlflow", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "results.json") in err and "missing" in err and "Traceback" not in err


def _sync_cli(capsys, *args: str) -> tuple[int, str, str]:
    """`exmap-ray sync-mlflow ...` in this process (`capsys` or `capfd`)."""
    capsys.readouterr()
    rc = main(["sync-mlflow", *args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_server_killed_mid_run_then_sync(tiny_run, tmp_path, capfd, caplog):
    """`exmap-ray run` in this process, on the session's Ray (a fresh local Ray in a subprocess costs
    about 20 s more and tests nothing else here); its output is read at the file-descriptor level."""

    from mlflow.tracking import MlflowClient

    out = tmp_path / "out"
    erm = Path(tiny_run[1]["cache"]["erm"]["dir"])  # the tiny ERM, trained once per session: the run reuses it
    shutil.copytree(erm, out / "cache" / erm.name)
    server = MlflowServer(tmp_path, _free_port()).start()
    # once the MLflow run exists with its params logged and ERM is done (reused; the heatmaps are still
    # to compute), the server is SIGKILLed
    killer, killed = _kill_when(server, lambda: any(r["stage"] == "erm" for r in StageCache(out / "cache").records()))
    try:
        capfd.readouterr()
        caplog.set_level(logging.WARNING, logger="exmap_ray")
        rc = main(["run", str(_spec(tmp_path)), "--out", str(out), "--tracking-uri", server.uri])
        stdout, stderr = capfd.readouterr()
        killer.join(timeout=5)
        assert killed.is_set(), "the server was never killed: ERM was not reached"
        assert rc == 0, stderr[-3000:]

        # everything is on disk, and the CLI says what happened once, with the command to fix it
        results = json.loads((out / "results.json").read_text())
        assert ARTIFACTS <= {p.name for p in out.iterdir()}
        assert (out / "group_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert "test WGA" in stdout and "NOT fully logged" in stdout
        # warned once (a log record: in this process pytest's log capture holds the driver's log lines)
        warned = [r.getMessage() for r in caplog.records if "became unreachable" in r.getMessage()]
        assert len(warned) == 1, warned
        assert server.uri in warned[0] and f"exmap-ray sync-mlflow {out}" in warned[0]
        assert not any(r.exc_info for r in caplog.records), caplog.text[-3000:]
        # the driver's own output (Ray worker lines are prefixed "(Name pid=...)", and Ray Train's internals
        # may print unrelated tracebacks when other Ray instances share the machine)
        driver = [l for l in stderr.splitlines() if "pid=" not in l.split(")")[0]]
        assert not any("Traceback" in l for l in driver + caplog.text.splitlines()), "\n".join(driver)[-3000:]
        pending = json.loads((out / "mlflow_pending.json").read_text())
        assert pending["uri"] == server.uri and pending["failed"]["call"] in {"log_metrics", "log_artifact"}
        run_id = results["mlflow_run_id"]
        assert run_id and pending["run_id"] == run_id  # the run was started before the server went away
        assert json.loads((out / "tracking.json").read_text())["uri"] == server.uri

        # a store that never saw the run (a copy of OUT, synced to a fresh SQLite db): a new, tagged run
        copy = tmp_path / "copy"
        shutil.copytree(out, copy)
        other = f"sqlite:///{tmp_path / 'other.db'}"
        rc, stdout, stderr = _sync_cli(capfd, str(copy), "--tracking-uri", other, "--quiet")
        assert rc == 0 and "created a new run" in stdout, stderr[-3000:]
        new_id = json.loads((copy / "results.json").read_text())["mlflow_run_id"]
        assert new_id != run_id and not (copy / "mlflow_pending.json").exists()
        fresh = MlflowClient(other).get_run(new_id)
        assert fresh.info.status == "FINISHED" and fresh.data.tags["exmap_ray.synced_from"] == str(copy.resolve())
        assert MlflowClient(other).get_experiment(fresh.info.experiment_id).name == "tiny"
        assert fresh.data.metrics["robust.test.worst_group_acc"] == pytest.approx(
            results["robust"]["test"]["worst_group_acc"]
        )

        # the server comes back on the same db; sync needs no flags (the URI is in OUT/tracking.json)
        server.start()
        client = MlflowClient(server.uri)
        assert client.get_run(run_id).info.status == "RUNNING"  # left open when the server died
        assert "robust.test.worst_group_acc" not in client.get_run(run_id).data.metrics
        rc, stdout, stderr = _sync_cli(capfd, str(out))
        assert rc == 0, stderr[-3000:]
        assert "completed the original run" in stdout and run_id in stdout

        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        m = run.data.metrics
        for row in ("erm", "robust", "oracle_dfr"):
            for key in ("worst_group_acc", "mean_acc", "mean_acc_train_weighted"):
                assert m[f"{row}.test.{key}"] == pytest.approx(results[row]["test"][key])
        assert m["robust.ari"] == pytest.approx(results["robust"]["ari"])
        assert m["timings_s.erm"] == pytest.approx(results["timings_s"]["erm"])
        assert [h.step for h in client.get_metric_history(run_id, "erm.train_loss")] == [1]  # 1 epoch, once
        assert run.data.params["clustering.method"] == "spectral"
        assert run.data.params["model.backbone"] == "test_resnet" and run.data.params["erm.epochs"] == "1"
        assert run.data.tags["exmap_ray.synced_from"] == str(out.resolve())
        assert ARTIFACTS <= {a.path for a in client.list_artifacts(run_id)}
        assert not (out / "mlflow_pending.json").exists()

        # again: nothing left to do
        rc, stdout, _ = _sync_cli(capfd, str(out))
        assert rc == 0 and "nothing to sync" in stdout
        assert len(client.get_metric_history(run_id, "robust.test.worst_group_acc")) == 1
    finally:
        killed.set()
        server.kill()


@pytest.mark.slow  # a heavier variant of the mid-run fault above (about 55 s): run on demand, -m slow
def test_server_killed_mid_sweep_then_sync(tiny_run, tmp_path, capsys):
    """The server dies after the first of three trials: the sweep finishes, then sync-mlflow nests it all."""

    from mlflow.tracking import MlflowClient

    from exmap_ray.spec import from_dict
    from exmap_ray.sync_mlflow import sync
    from exmap_ray.tune import run_sweep

    d = tiny_spec_dict()
    d["search"] = {"space": {"clustering.k": {"grid": [2, 3, 4]}}, "max_concurrent_trials": 2}
    out = tmp_path / "sweep"
    server = MlflowServer(tmp_path, _free_port()).start()
    # a trial's result file is written after its MLflow run ended
    killer, killed = _kill_when(server, lambda: any((out / "trial_results").glob("*.json")))
    try:
        summary = run_sweep(from_dict(d), out, tiny_run[0] / "cache", server.uri)
        killer.join(timeout=5)
        assert killed.is_set(), "the sweep finished before the server could be killed"
        assert summary["n_trials"] == 3 and summary["n_failed"] == 0  # no trial failed for want of MLflow
        assert (out / "summary.md").is_file() and summary["label_free_choice"] is not None
        pending = set(summary["mlflow_pending"])
        assert str(out.resolve()) in pending and len(pending) >= 2  # the parent and the trials after the kill
        parent_id = summary["mlflow_parent_run_id"]

        server.start()  # back on the same db: the sweep folder is synced, trials nested under the parent
        rc, stdout, stderr = _sync_cli(capsys, str(out))  # the CLI on the sweep's folder
        assert rc == 0, stderr[-3000:]
        assert f"completed the original run (sweep parent run) {parent_id}" in stdout
        assert stdout.count("  trial run_trial_") == len(pending) - 1  # one line per trial synced
        client = MlflowClient(server.uri)
        parent = client.get_run(parent_id)
        assert parent.info.status == "FINISHED"
        assert parent.data.metrics["label_free_choice.test_worst_group_acc"] == pytest.approx(
            summary["label_free_choice"]["test_worst_group_acc"]
        )
        assert {"summary.md", "summary.csv", "summary.json"} <= {a.path for a in client.list_artifacts(parent_id)}
        exp = parent.info.experiment_id
        kids = client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent_id}'")
        by_name = {k.info.run_name: k for k in kids}
        assert set(by_name) == {r["trial"] for r in summary["rows"]}  # every trial once, nested
        for r in summary["rows"]:
            k = by_name[r["trial"]]
            assert k.info.status == "FINISHED"
            assert k.data.metrics["robust.test.worst_group_acc"] == pytest.approx(r["test_worst_group_acc"])
        assert not list(out.rglob("mlflow_pending.json"))
        assert sync(out)["status"] == "nothing pending"
    finally:
        killed.set()
        server.kill()


def test_server_killed_mid_bench_keeps_every_result_then_sync(tiny_run, tmp_path, capsys):
    """bench logs through the tracker too: the server dies once its MLflow run exists, and bench still
    finishes every row and file, with the marker naming the run (the tiny run's cache: no stage recomputed).
    Back on the same db, sync-mlflow completes that run from bench.json, and a second sync does nothing."""
    from mlflow.tracking import MlflowClient

    from exmap_ray import tracking

    from exmap_ray.bench import ROWS, dpe_rows, peer_rows, run_bench
    from exmap_ray.spec import from_dict

    out = tmp_path / "bench"
    server = MlflowServer(tmp_path, _free_port()).start()
    killer, killed = _kill_when(
        server, lambda: json.loads((out / "tracking.json").read_text()).get("run_id"), poll=0.02
    )
    try:
        summary = run_bench(from_dict(tiny_spec_dict()), [0], out, tiny_run[0] / "cache", server.uri)
        killer.join(timeout=5)
        assert killed.is_set() and summary["mlflow_pending"]
        # peers: with SpuCo installed; DPE: with dpe installed
        assert [r["row"] for r in summary["rows"]] == [name for name, *_ in ROWS + peer_rows() + dpe_rows()]
        for f in ("bench.md", "bench.csv", "bench.json", "bench_wga.png"):
            assert (out / f).stat().st_size > 0
        pending = json.loads((out / "mlflow_pending.json").read_text())
        assert pending["uri"] == server.uri and pending["run_id"] == summary["mlflow_run_id"] is not None

        server.start()  # back on the same db; the URI comes from OUT/tracking.json
        rc, stdout, _ = _sync_cli(capsys, str(out))
        assert rc == 0 and f"completed the original run (bench run) {pending['run_id']}" in stdout, stdout
        run = MlflowClient(server.uri).get_run(pending["run_id"])
        assert run.info.status == "FINISHED" and run.data.tags["exmap_ray.synced_from"] == str(out.resolve())
        saved = json.loads((out / "bench.json").read_text())
        want = tracking.flat_metrics(tracking.bench_metrics(saved["rows"]))
        assert want and all(run.data.metrics[k] == pytest.approx(v) for k, v in want.items())
        spec = json.loads((out / "spec.resolved.json").read_text())
        assert run.data.params["retrain.dfr.c_grid"] == str(spec["retrain"]["dfr"]["c_grid"])
        assert run.data.params["bench.seeds"] == "[0]"
        logged = {a.path for a in MlflowClient(server.uri).list_artifacts(run.info.run_id)}
        assert set(tracking.BENCH_ARTIFACTS) <= logged
        assert not (out / "mlflow_pending.json").exists()
        rc, stdout, _ = _sync_cli(capsys, str(out))
        assert rc == 0 and "nothing to sync" in stdout
    finally:
        killed.set()
        server.kill()
