"""Laptop to cluster: the same commands on a 3-node Ray cluster whose nodes share no disk.

The cluster (local_cluster.py): a 0-CPU head and two worker nodes, each worker in its own mount
namespace with a private tmpfs over the test's temp tree; S3 is moto's server on 127.0.0.1;
MLflow runs on the head with its artifacts in the bucket; Ray token authentication is on. Jobs
go in through `ray job submit --working-dir .`, as from a laptop. Every artifact must travel
through the bucket, or the run could not finish.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest

from ..conftest import machine_to_itself
from .local_cluster import REPO, LocalCluster, can_run

pytestmark = [
    pytest.mark.skipif(can_run() is not None, reason=f"multi-node cluster test: {can_run()}"),
    pytest.mark.cluster,
]
SPEC = "tests/cluster/tiny.yaml"
SWEEP = "tests/cluster/tiny_sweep.yaml"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    # the whole test temp tree (and the cluster's own folder) is invisible to the worker nodes
    # worker node 0 lists a logical GPU (tiny.yaml sets resources.gpu false, so only the GPU test uses it)
    c = LocalCluster([tmp_path_factory.getbasetemp()], worker_gpus={0: 1})
    try:
        with machine_to_itself():  # under `make test`'s two processes, the nodes register alone
            c.start()
        yield c
    finally:
        c.stop()
        shutil.rmtree(c.base, ignore_errors=True)


@pytest.fixture(scope="module")
def single_node(tiny_run):
    """The same spec and seed on one node: the session's tiny run (tests/cluster/tiny.yaml is that spec).
    Requested before the cluster starts: Ray Train's helpers look for *the* local Ray and refuse two."""
    from exmap_ray.spec import from_dict, load_spec

    from ..conftest import tiny_spec_dict

    from exmap_ray.stages import execution_only

    mine, theirs = load_spec(REPO / SPEC).to_dict(), from_dict(tiny_spec_dict()).to_dict()
    for section in ("seed", "dataset", "model", "erm", "heatmaps", "clustering", "groups", "retrain"):
        if isinstance(mine[section], dict):  # how a stage runs may differ (tiny.yaml: 2 heatmap actors, one a node)
            for key in execution_only(section):
                mine[section].pop(key, None), theirs[section].pop(key, None)
        assert mine[section] == theirs[section], f"tests/cluster/tiny.yaml differs from the tiny spec in {section}"
    assert mine["resources"]["worker_cpus"] == theirs["resources"]["worker_cpus"]
    return tiny_run


def s3fs(c: LocalCluster):
    from pyarrow import fs as pafs

    return pafs.S3FileSystem(
        access_key="testing",
        secret_key="testing",
        region="us-east-1",
        scheme="http",
        endpoint_override=f"127.0.0.1:{c.s3_port}",
    )


def s3_read(c: LocalCluster, path: str) -> bytes:
    with s3fs(c).open_input_stream(f"exmap/{path}") as f:
        return f.read()


def s3_list(c: LocalCluster, prefix: str) -> list[str]:
    from pyarrow import fs as pafs

    infos = s3fs(c).get_file_info(pafs.FileSelector(f"exmap/{prefix}", recursive=True, allow_not_found=True))
    return [i.path.removeprefix("exmap/") for i in infos if i.type == pafs.FileType.File]


def records(c: LocalCluster) -> list[dict]:
    return [json.loads(s3_read(c, p)) for p in s3_list(c, "cache/records")]


def computed_twice(recs: list[dict]) -> list[str]:
    keys = [f"{r['stage']}-{r['key']}" for r in recs if r["event"] == "computed"]
    return sorted({k for k in keys if keys.count(k) > 1})


def assert_same_results(got: dict, want: dict) -> None:
    want = json.loads(json.dumps(want, default=str))  # as read back from results.json
    for row in ("erm", "robust", "oracle_dfr"):
        assert got[row]["test"] == want[row]["test"], row
    assert got["robust"]["k_chosen"] == want["robust"]["k_chosen"]
    assert got["robust"]["pseudo_group_sizes"] == want["robust"]["pseudo_group_sizes"]


@pytest.fixture(scope="module")
def jobs(single_node, cluster):
    """`exmap-ray run`, then a small `exmap-ray tune` on the same cache, submitted as from a laptop. Once
    the sweep's trials are running, one worker node's raylet is SIGKILLed; the sweep must still finish.

    One after the other: on 2 cores, two jobs at once only share the CPUs (both drivers import torch and
    timm at the same moment); measured, both jobs took 262 to 279 s together and 266 s in turn, and in
    turn a failure names its job. Claimants that wait for each other are tested in tests/test_storage.py."""
    c = cluster
    t0 = time.monotonic()
    common = f"--cache '{c.s3_uri('cache')}' --tracking-uri {c.tracking_uri}"
    run = c.submit(f"exmap-ray run {SPEC} --out '{c.s3_uri('run')}' {common}", wait=False)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    ids = {"run": c.job_id(run)}
    states = {"run": c.wait_job(ids["run"], 600)}
    run_s = time.monotonic() - t0
    sweep = c.submit(f"exmap-ray tune {SWEEP} --out '{c.s3_uri('sweep')}' {common}", wait=False)
    assert sweep.returncode == 0, (sweep.stdout + sweep.stderr)[-3000:]
    ids["sweep"] = c.job_id(sweep)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:  # kill a worker node once trials are running
        if any(p.endswith("spec.resolved.json") for p in s3_list(c, "sweep/trials")):
            break
        assert c.job_status(ids["sweep"]) not in ("SUCCEEDED", "FAILED", "STOPPED"), c.job_logs(ids["sweep"])[-4000:]
        time.sleep(1)
    else:
        pytest.fail("no trial started within 600 s:\n" + c.job_logs(ids["sweep"])[-4000:])
    killed_at = time.monotonic() - t0
    os.kill(c.raylet_pid(1), signal.SIGKILL)
    states["sweep"] = c.wait_job(ids["sweep"], 600)  # bounds a hang; a quiet machine needs far less
    print(
        f"\ncluster jobs: run ended at {run_s:.0f} s; a node killed at {killed_at:.0f} s; the sweep ended at "
        f"{time.monotonic() - t0:.0f} s: {states}"
    )
    wall0 = time.time() - (time.monotonic() - t0)
    for r in sorted(records(c), key=lambda r: r["time"]):  # the stages' timeline, for the log
        print(f"  {r['time'] - wall0:6.1f} s  {r['stage']:<9} {r['event']:<9} {r.get('seconds', '')}")
    logs = {k: c.job_logs(j) for k, j in ids.items()}
    print("\n".join(line for line in logs["run"].splitlines() if line[:4].isdigit())[:6000])  # timestamped lines
    return {"states": states, "logs": logs}


def test_run_on_the_cluster_matches_one_node_and_logs_to_mlflow(single_node, cluster, jobs):
    c = cluster
    assert jobs["states"]["run"] == "SUCCEEDED", jobs["logs"]["run"][-5000:]
    got = json.loads(s3_read(c, "run/results.json"))
    local_out, want = single_node
    assert_same_results(got, want)
    # from scratch (its own cache, in the bucket) on three nodes, the same as on one: this is also the suite's
    # reproducibility check (tests/faults/test_reproducible.py runs it on one node where no cluster can)
    with np.load(io.BytesIO(s3_read(c, "run/selection.npz"))) as z, np.load(local_out / "selection.npz") as w:
        np.testing.assert_array_equal(z["pseudo_groups"], w["pseudo_groups"])  # the same pseudo groups
        np.testing.assert_array_equal(z["heldout_pred"], w["heldout_pred"])
    assert got["robust"]["dfr_C"] == want["robust"]["dfr_C"] and got["robust"]["ari"] == want["robust"]["ari"]
    # every stage folder, its done marker, the shards the actors wrote and the plots are in the bucket
    files = s3_list(c, "")
    for stage in ("erm", "features", "heatmaps", "clusters"):
        assert any(p.startswith(f"cache/{stage}-") and p.endswith("/done") for p in files), stage
    assert any("/shard-00002.npy" in p for p in files) and "run/heatmaps_by_pseudo_group.png" in files
    assert not any("ray_train" in p for p in files)  # ERM's checkpoints went through the bucket, then away

    from mlflow.tracking import MlflowClient

    client = MlflowClient(c.tracking_uri)
    run = client.get_run(got["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.params["dataset.name"] == "cmnist"
    assert not any("testing" in v or c.token in v for v in run.data.params.values())  # no credentials
    import mlflow

    local = mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="results.json", tracking_uri=c.tracking_uri
    )
    assert json.loads(open(local).read())["robust"]["test"] == got["robust"]["test"]  # read through the server
    assert any(p.startswith("mlartifacts/") and p.endswith("results.json") for p in files)  # stored in the bucket


def test_sweep_survives_losing_a_node(single_node, cluster, jobs):
    c = cluster
    logs = jobs["logs"]["sweep"]
    assert jobs["states"]["sweep"] == "SUCCEEDED", logs[-5000:]
    summary = json.loads(s3_read(c, "sweep/summary.json"))
    assert summary["n_trials"] == 2 and summary["n_failed"] == 0, logs[-3000:]
    # the trial that is the tiny spec itself gives the single-node run's results
    same = [r for r in summary["rows"] if r["config.clustering.k"] == "auto"]
    assert len(same) == 1
    trial = json.loads(s3_read(c, f"sweep/trials/{same[0]['trial']}/results.json"))
    assert_same_results(trial, single_node[1])

    from mlflow.tracking import MlflowClient

    client = MlflowClient(c.tracking_uri)
    parent = summary["mlflow_parent_run_id"]
    exp = client.get_run(parent).info.experiment_id
    children = client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent}' and attributes.status = 'FINISHED'")
    assert len({r.info.run_name for r in children}) == 2
    assert {a.path for a in client.list_artifacts(parent)} >= {"summary.json", "summary.md"}


def test_no_stage_is_computed_twice_across_jobs_and_node_loss(cluster, jobs):
    recs = records(cluster)
    assert computed_twice(recs) == []
    # the run computed ERM and the heatmaps; the sweep (its driver and its trials) reused them
    for stage in ("erm", "heatmaps"):
        events = [r["event"] for r in recs if r["stage"] == stage]
        assert events.count("computed") == 1 and "reused" in events, (stage, events)


def test_nothing_is_written_outside_the_bucket_but_node_caches(cluster, jobs):
    c = cluster
    repo_files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    listing = c.base / "repo_files.json"
    listing.write_text(json.dumps(repo_files))
    r = c.submit(f"python tests/cluster/list_node_files.py {c.base} {listing}")
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    line = next(l for l in (r.stdout + r.stderr).splitlines() if l.startswith("NODE_FILES "))
    per_node = json.loads(line.removeprefix("NODE_FILES "))
    assert per_node and all(files == [] for files in per_node.values()), per_node
    # the head (where the drivers ran): Ray's temp folder, the node cache, the MLflow server's db, the logs
    head = c.base / "head"
    extra = []
    for p in head.rglob("*"):
        rel = p.relative_to(head)
        if not p.is_file() or rel.parts[0] in ("cache", "mlflow.db") or rel.name.startswith("mlflow.db"):
            continue
        if "working_dir_files" in rel.parts:
            inner = rel.parts[rel.parts.index("working_dir_files") + 2 :]  # () beside the copies: Ray's zip, lock
            if inner and "/".join(inner) not in repo_files and "__pycache__" not in inner:  # bytecode: derived
                extra.append(str(rel))
        elif rel.parts[0] != "ray":
            extra.append(str(rel))
    assert extra == []
    assert not list(c.base.rglob("s3:*"))


def test_gpu_stages_run_on_the_gpu_node_never_on_the_head(cluster):
    """resources.gpu true on a cluster whose head has no GPU and one worker lists a logical GPU (its torch
    side on the CPU: EXMAP_RAY_FAKE_CUDA=1 in the job's runtime env): ERM's worker, the features and
    clusters tasks and both heatmap actors (sharing the GPU) run on the GPU node, none in the driver on
    the head, and each holds Ray's GPU. Last in this module: after the other jobs (which kill worker node 1,
    never the GPU node), or alone (-k gpu_stages)."""
    c = cluster
    common = f"--cache '{c.s3_uri('gpu-cache')}' --tracking-uri {c.tracking_uri}"
    r = c.submit(
        f"exmap-ray run {SPEC} --out '{c.s3_uri('gpu-run')}' {common} --set resources.gpu=true "
        f"--set heatmaps.actors_per_gpu=2",
        runtime_env={"env_vars": {"EXMAP_RAY_FAKE_CUDA": "1"}},
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-5000:]
    nodes = c.nodes()
    gpu_nodes = {n["node_id"] for n in nodes if n.get("resources_total", {}).get("GPU", 0) > 0}
    head = {n["node_id"] for n in nodes if n.get("is_head_node")}
    assert len(gpu_nodes) == 1 and head and not gpu_nodes & head, nodes
    done = {
        p.split("/")[1].split("-")[0]: json.loads(s3_read(c, p)) for p in s3_list(c, "gpu-cache") if p.endswith("/done")
    }
    placements = [
        done["erm"]["environment"]["placement"],
        done["features"]["placement"],
        done["clusters"]["placement"],
        *done["heatmaps"]["placements"],
    ]
    # both actors ask for the GPU node; under load one may finish every shard before the other is up
    assert 1 <= len(done["heatmaps"]["placements"]) <= 2
    for p in placements:
        assert p["node_id"] in gpu_nodes and p["ray_worker"] and p["gpu_ids"] == ["0"], p
    results = json.loads(s3_read(c, "gpu-run/results.json"))
    assert results["config"]["resources"]["gpu"] is True
