"""Ray Tune sweeps on a real local Ray into a real SQLite MLflow: nesting, reuse, resume."""

import json
import os
import subprocess
import sys
import time

import pytest
import yaml
from mlflow.tracking import MlflowClient

from exmap_ray.cli import main
from exmap_ray.errors import SpecError
from exmap_ray.search import flatten_space, n_trials, parse_space
from exmap_ray.spec import from_dict
from exmap_ray.cache import StageCache
from exmap_ray.tune import ATTEMPT_TAG, _mark_killed_children

from .conftest import kill_session, tiny_spec_dict

SPACE = {"clustering.k": {"grid": [2, "auto"]}, "clustering.scope": {"grid": ["local", "global"]}}


def _sweep_spec(tmp_path, **search):
    d = tiny_spec_dict()
    d["search"] = {"space": SPACE, "max_concurrent_trials": 2, **search}
    p = tmp_path / "sweep.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


def _children(client, parent_id):
    exp = client.get_run(parent_id).info.experiment_id
    return client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent_id}'")


def test_search_space_validation():
    spec = from_dict(
        {"search": {"space": {"clustering": {"k": {"grid": [2, 3]}}, "retrain.dfr.n_final_fits": {"randint": [2, 9]}}}}
    )
    assert flatten_space(spec.search.space) == {
        "clustering.k": {"grid": [2, 3]},
        "retrain.dfr.n_final_fits": {"randint": [2, 9]},
    }
    domains = parse_space(spec)
    assert [d.key for d in domains] == ["clustering.k", "retrain.dfr.n_final_fits"] and n_trials(domains, 3) == 6
    for space, msg in [
        ({}, "search.space' is empty"),
        ({"clustering.kk": {"grid": [2]}}, "Did you mean 'clustering.k'"),
        ({"clustering.k": {"grid": [1]}}, "value 1 is not valid"),
        ({"clustering.k": {"among": [2]}}, "expected one of"),
        ({"erm.lr": {"uniform": [1.0, 0.1]}}, "lo < hi"),
        ({"dfr.c_grid": {"grid": [[1.0]]}}, "'dfr.c_grid' has moved: use 'retrain.dfr.c_grid'"),
        ({"dfr": {"n_final_fits": {"grid": [2]}}}, "'dfr.n_final_fits' has moved: use 'retrain.dfr"),
        ({"retrain.e2e_lr": {"grid": [0.1]}}, "'retrain.e2e_lr' has moved: use 'retrain.end_to_end.lr'"),
        ({"dataset.root": {"grid": ["/data"]}}, "'dataset.root' is not a key of dataset 'cmnist'"),
        ({"retrain.groupdro.lr": "default"}, "declares none"),
    ]:
        with pytest.raises(SpecError, match=msg):
            parse_space(from_dict({"search": {"space": space}}))


def test_default_takes_the_range_declared_with_the_key():
    """`search.space: {KEY: default}`: the domain the key's declaration carries (beside its code)."""
    import dataclasses

    from exmap_ray.retrain import GroupDROKeys

    declared = {f.name: f.metadata["search"] for f in dataclasses.fields(GroupDROKeys)}["eta"]
    (d,) = parse_space(from_dict({"search": {"space": {"retrain.groupdro.eta": "default"}}}))
    kind, values = next(iter(declared.items()))
    assert (d.key, d.kind, list(d.values)) == ("retrain.groupdro.eta", kind, values)


def test_one_se_rule_prefers_fewer_groups_within_the_noise():
    from exmap_ray.tune import choose

    def row(name, score, se, n_groups, status="OK"):
        return {"trial": name, "status": status, "selection_metric": score, "selection_se": se, "n_groups": n_groups}

    rows = [row("a", 0.70, 0.03, 7), row("b", 0.68, 0.02, 4), row("c", 0.66, 0.02, 3), row("d", 0.9, 0.0, 2, "ERROR")]
    assert choose(rows, "best")["trial"] == "a"
    assert choose(rows, "one_se")["trial"] == "b"  # c is 0.04 below a: outside one SE (0.03)
    rows[0]["selection_se"] = 0.05
    assert choose(rows, "one_se")["trial"] == "c"
    rows[0]["selection_se"] = float("nan")  # no noise estimate (a single held-out half): the plain best
    assert choose(rows, "one_se")["trial"] == "a"
    assert choose([], "one_se") is None


def test_sweep_nests_trials_shares_upstream_and_summarizes(tiny_run, tmp_path, capsys):
    out = tmp_path / "sweep"
    cache = tiny_run[0] / "cache"  # the tiny spec's ERM and heatmaps, computed once per session
    before = len(StageCache(cache).records())
    assert main(["tune", str(_sweep_spec(tmp_path)), "--out", str(out), "--cache", str(cache), "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_trials"] == 4 and summary["n_failed"] == 0
    chosen, oracle, top = summary["label_free_choice"], summary["oracle_choice"], summary["label_free_top"]
    assert summary["select"] == "one_se" and top["selection_metric"] == max(
        r["selection_metric"] for r in summary["rows"]
    )
    assert top["selection_se"] >= 0  # the one-SE rule: within the top score's noise, the fewest pseudo groups
    band = [r for r in summary["rows"] if r["selection_metric"] >= top["selection_metric"] - top["selection_se"]]
    assert chosen["trial"] in {r["trial"] for r in band}
    assert chosen["n_groups"] == min(r["n_groups"] for r in band)
    assert oracle["oracle_val_worst_group_acc"] == max(r["oracle_val_worst_group_acc"] for r in summary["rows"])
    assert {"config.clustering.k", "config.clustering.scope"} <= set(chosen)
    for f in ("summary.csv", "summary.md", "wga_vs_selection_metric.png", "wga_vs_k.png"):
        assert (out / f).stat().st_size > 0
    assert "label-free choice" in capsys.readouterr().out

    # the cached ERM and heatmaps serve the whole sweep (none recomputed); each trial clusters once
    events = [(r["stage"], r["event"]) for r in StageCache(cache).records()[before:]]
    assert ("erm", "computed") not in events and ("heatmaps", "computed") not in events
    assert events.count(("erm", "reused")) == 5  # the driver's shared-upstream pass + 4 trials
    assert events.count(("clusters", "computed")) + events.count(("clusters", "reused")) == 4

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    parent = client.get_run(summary["mlflow_parent_run_id"])
    assert parent.data.params["model.backbone"] == "test_resnet"
    assert "label_free_choice.test_worst_group_acc" in parent.data.metrics
    assert {"summary.csv", "summary.md", "wga_vs_selection_metric.png"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id)
    }
    kids = _children(client, parent.info.run_id)
    assert len(kids) == 4 and {k.info.run_name for k in kids} == {r["trial"] for r in summary["rows"]}
    for k in kids:
        assert k.data.params["clustering.k"] in ("2", "auto") and "robust.val.worst_pseudo_group_acc" in k.data.metrics
        assert "group_accuracy.png" in {a.path for a in client.list_artifacts(k.info.run_id)}

    # an existing sweep is not overwritten without --resume
    assert main(["tune", str(_sweep_spec(tmp_path)), "--out", str(out)]) == 2
    assert "add --resume" in capsys.readouterr().err


def test_interrupted_sweep_resumes_without_rerunning_finished_trials(tiny_run, tmp_path, capsys):
    """SIGKILL the whole `exmap-ray tune` process group mid-sweep, then --resume."""
    out = tmp_path / "sweep"
    spec = _sweep_spec(tmp_path, max_concurrent_trials=2)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    cache = tiny_run[0] / "cache"  # the tiny spec's ERM and heatmaps, computed once per session
    before = len(StageCache(cache).records())
    cmd = [sys.executable, "-m", "exmap_ray", "tune", str(spec), "--out", str(out), "--cache", str(cache), "--quiet"]
    log = open(tmp_path / "killed.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 240
    try:
        while time.time() < deadline and len(list(out.glob("trial_results/*.json"))) < 1:
            assert proc.poll() is None, "the sweep ended before it could be interrupted"
            time.sleep(0.5)
    finally:
        kill_session(proc)  # the driver, its Ray and every trial process
        log.close()
    finished = {json.loads(p.read_text())["trial"] for p in out.glob("trial_results/*.json")}
    assert 1 <= len(finished) < 4, finished
    # --quiet, in the killed sweep's own output (its trials ran to the end): no Tune tables, no
    # per-trial INFO lines from the workers
    printed = (tmp_path / "killed.log").read_text()
    for noise in ("Trial status", "Checkpoint successfully created", "── stage", "Loading faiss"):
        assert noise not in printed, (noise, printed[-3000:])

    # the resume runs in this process, on the session's Ray: what is under test is what the killed
    # sweep left behind, which a fresh driver finds the same way (a fresh local Ray costs ~20 s here)
    capsys.readouterr()
    assert main(cmd[3:] + ["--resume"]) == 0
    assert "label-free choice" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_trials"] == 4 and summary["n_failed"] == 0
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    kids = _children(client, summary["mlflow_parent_run_id"])
    names = [k.info.run_name for k in kids if k.info.status == "FINISHED"]
    for name in finished:  # a trial that had finished before the kill ran exactly once
        assert names.count(name) == 1, (name, names)
    assert set(names) == {r["trial"] for r in summary["rows"]}
    assert all(k.info.status in ("FINISHED", "KILLED") for k in kids)  # no run left dangling as RUNNING
    # each driver tags the runs of the trials it started: the killed one's and the resumed one's
    assert len({k.data.tags.get(ATTEMPT_TAG) for k in kids}) == 2 and all(k.data.tags.get(ATTEMPT_TAG) for k in kids)
    events = [(r["stage"], r["event"]) for r in StageCache(cache).records()[before:]]
    assert ("erm", "computed") not in events  # neither the killed nor the resumed driver retrained ERM
    assert events.count(("erm", "reused")) >= 2


def test_resume_marks_only_other_attempts_runs_killed(tmp_path, monkeypatch):
    """After a resumed sweep's trials end, a child run still RUNNING was started by a process of the
    interrupted sweep (which can outlive its driver by seconds): it is marked KILLED. The resumed
    driver's own runs, and ended runs, are left alone."""
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = MlflowClient()
    exp = client.create_experiment("sweep")
    parent = client.create_run(exp, run_name="sweep").info.run_id

    def child(name, attempt, status=None):
        run = client.create_run(exp, run_name=name, tags={"mlflow.parentRunId": parent, ATTEMPT_TAG: attempt})
        if status:
            client.set_terminated(run.info.run_id, status=status)
        return run.info.run_id

    orphan, mine, done = child("t1", "old"), child("t2", "new"), child("t3", "old", "FINISHED")
    _mark_killed_children(parent, keep_attempt="new")
    status = {r: client.get_run(r).info.status for r in (orphan, mine, done)}
    assert status == {orphan: "KILLED", mine: "RUNNING", done: "FINISHED"}
    _mark_killed_children(parent)  # at the start of a resume: every RUNNING child
    assert client.get_run(mine).info.status == "KILLED"
    assert mlflow.active_run() is None


def test_sweep_over_erm_runs_ray_train_inside_trials(tiny_run, tmp_path):
    """ERM keys in the search: nothing upstream is shared, so each trial launches its own TorchTrainer.

    lr 0.001 is the tiny spec's own, so that trial finds its ERM in the session's cache; lr 0.003 trains
    one inside its trial (and extracts its heatmaps there)."""
    d = tiny_spec_dict()
    d["search"] = {"space": {"erm.lr": {"grid": [0.001, 0.003]}}, "max_concurrent_trials": 2}
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(d))
    out, cache = tmp_path / "sweep", tiny_run[0] / "cache"
    before = len(StageCache(cache).records())
    assert main(["tune", str(p), "--out", str(out), "--cache", str(cache), "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_trials"] == 2 and summary["n_failed"] == 0
    new = [r for r in StageCache(cache).records()[before:] if r["stage"] == "erm"]
    assert sorted(r["event"] for r in new) == ["computed", "reused"]  # the driver precomputed nothing
    [computed] = [r for r in new if r["event"] == "computed"]
    assert computed["pid"] != os.getpid()  # trained by the trial's TorchTrainer, not by the driver


# optuna in every suite; hyperopt, the same path through another searcher, on demand (-m slow)
@pytest.mark.parametrize("algorithm", ["optuna", pytest.param("hyperopt", marks=pytest.mark.slow)])
def test_model_based_searcher_samples_choices_and_names_trials(tiny_run, tmp_path, algorithm):
    """search.algorithm optuna / hyperopt: real searchers proposing trials, a choice among DFR C grids
    (lists, which Optuna's categoricals cannot hold) decoded back into spec values, trials named as in MLflow."""
    space = {
        "clustering.k": {"choice": [2, "auto"]},
        "retrain.dfr.c_grid": {"choice": [[1.0, 0.1], [0.3]]},
        "retrain.dfr.n_final_fits": {"randint": [2, 5]},
    }
    p = _sweep_spec(tmp_path, space=space, algorithm=algorithm, num_samples=3)
    out, cache = tmp_path / "sweep", tiny_run[0] / "cache"
    assert main(["tune", str(p), "--out", str(out), "--cache", str(cache), "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_trials"] == 3 and summary["n_failed"] == 0
    for r in summary["rows"]:
        assert r["config.clustering.k"] in (2, "auto") and r["config.retrain.dfr.c_grid"] in ([1.0, 0.1], [0.3])
        assert 2 <= r["config.retrain.dfr.n_final_fits"] < 5
        assert r["trial"].startswith("run_trial_") and "/" not in r["trial"]
    results = [json.loads(f.read_text()) for f in out.glob("trial_results/*.json")]
    assert results and all(res["robust"]["dfr_C"] in (1.0, 0.1, 0.3) for res in results)  # the grid reached DFR
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    kids = _children(client, summary["mlflow_parent_run_id"])
    # a searcher may propose a point twice; the repeat reports the first trial's results, so the
    # MLflow child runs are the distinct trials that ran the pipeline
    assert {k.info.run_name for k in kids} == {res["trial"] for res in results}
    assert {k.info.run_name for k in kids} <= {r["trial"] for r in summary["rows"]}
    for k in kids:
        assert k.data.params["retrain.dfr.c_grid"] in ("[1.0, 0.1]", "[0.3]")


def test_searchers_refuse_grids_by_key():
    with pytest.raises(SpecError, match=r"search\.space\.clustering\.k\.grid.*'optuna'.*choice"):
        parse_space(from_dict({"search": {"algorithm": "optuna", "space": {"clustering.k": {"grid": [2, 3]}}}}))
    assert parse_space(from_dict({"search": {"algorithm": "optuna", "space": {"clustering.k": {"choice": [2, 3]}}}}))
