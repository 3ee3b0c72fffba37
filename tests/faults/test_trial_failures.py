"""Fault 3: a Tune trial raises. It is retried up to search.max_failures; a trial that keeps
failing is reported in the summary with its error, and the other trials' results stand."""

import json

import yaml
from mlflow.tracking import MlflowClient

from exmap_ray.cli import main
from exmap_ray.faults import hits

from ..conftest import tiny_spec_dict


def test_failing_trials_are_retried_then_reported(tiny_run, tmp_path, fault_plan, capsys):
    d = tiny_spec_dict()
    d["search"] = {"space": {"clustering.k": {"grid": [2, 3, 4]}}, "max_concurrent_trials": 2, "max_failures": 1}
    spec = tmp_path / "sweep.yaml"
    spec.write_text(yaml.safe_dump(d))
    plan = fault_plan(
        [
            {"point": "trial", "when": {"clustering.k": 3}, "times": 1, "message": "transient failure"},
            {"point": "trial", "when": {"clustering.k": 4}, "times": 99, "message": "persistent failure"},
        ]
    )
    out = tmp_path / "sweep"
    cache = tiny_run[0] / "cache"  # the tiny spec's ERM and heatmaps, trained once per session
    assert main(["tune", str(spec), "--out", str(out), "--cache", str(cache), "--quiet"]) == 0  # it completes

    assert hits(plan, 0) == 1  # k=3 failed once ...
    assert hits(plan, 1) == 2  # ... k=4 failed on its first try and on its one retry (max_failures: 1)
    summary = json.loads((out / "summary.json").read_text())
    by_k = {r["config.clustering.k"]: r for r in summary["rows"]}
    assert by_k[3]["status"] == "OK" and by_k[2]["status"] == "OK"  # ... and k=3 succeeded on its retry
    assert by_k[4]["status"] == "ERROR" and "persistent failure" in by_k[4]["error"]
    assert summary["n_trials"] == 3 and summary["n_failed"] == 1
    assert summary["label_free_choice"]["config.clustering.k"] in (2, 3)  # the others' results stand
    md = (out / "summary.md").read_text()
    assert "ERROR" in md and "persistent failure" in md
    printed = capsys.readouterr().out
    assert "1 failed" in printed and "FAILED" in printed and "persistent failure" in printed

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_run(summary["mlflow_parent_run_id"]).info.experiment_id
    kids = client.search_runs([exp], f"tags.mlflow.parentRunId = '{summary['mlflow_parent_run_id']}'")
    assert sorted(k.data.params["clustering.k"] for k in kids if k.info.status == "FINISHED") == ["2", "3"]
