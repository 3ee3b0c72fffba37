"""The whole pipeline through the CLI: real local Ray, real SQLite MLflow, real artifacts."""

import json

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

from exmap_ray.cli import main
from exmap_ray.cache import StageCache

from .conftest import tiny_spec_dict

REQUIRED = [
    "erm.test.worst_group_acc",
    "erm.test.mean_acc",
    "erm.test.per_group",
    "robust.test.worst_group_acc",
    "robust.test.mean_acc",
    "robust.test.per_group",
    "robust.n_groups",
    "robust.ari",
    "robust.nmi",
    "oracle_dfr.test.worst_group_acc",
    "oracle_dfr.test.mean_acc",
    "timings_s",
    "config",
    "mlflow_run_id",
]


def _get(d, dotted):
    for part in dotted.split("."):
        d = d[part]
    return d


def _write_spec(tmp_path, **over):
    p = tmp_path / "spec.yaml"
    p.write_text(yaml.safe_dump(tiny_spec_dict(**over)))
    return p


def test_run_cmnist_end_to_end(tiny_run, tmp_path, capsys):
    out = tmp_path / "run"
    cache = tiny_run[0] / "cache"  # the tiny spec's stages, computed from scratch once per session
    before = len(StageCache(cache).records())
    assert main(["run", str(_write_spec(tmp_path)), "--out", str(out), "--cache", str(cache), "--set", "seed=0"]) == 0
    res = json.loads((out / "results.json").read_text())
    for key in REQUIRED:
        _get(res, key)
    for row in ("erm", "robust", "oracle_dfr"):
        t = res[row]["test"]
        assert 0 <= t["worst_group_acc"] <= t["mean_acc"] <= 1
        assert set(t["per_group"]) == {"y<5 red", "y<5 green", "y>=5 red", "y>=5 green"}
    assert -1 <= res["robust"]["ari"] <= 1 and res["robust"]["n_groups"] >= 2
    v = res["robust"]["val"]  # label-free (pseudo groups, classes) and oracle, on held-out val halves
    assert all(0 <= v[k] <= 1 for k in ("worst_pseudo_group_acc", "worst_class_acc", "oracle_worst_group_acc"))
    assert set(res["timings_s"]) >= {"erm", "heatmaps", "clusters", "retrain"}
    assert res["config"]["model"]["backbone"] == "test_resnet"
    # what computed it: this driver, and the Ray Train worker that trained the (cached) ERM, with its threads
    import timm

    env = res["environment"]
    assert env["driver"]["packages"]["timm"] == timm.__version__ == env["erm"]["packages"]["timm"]
    assert env["erm"]["torch_threads"] == 1 and env["erm"]["torch_cpu_kernels"] and env["erm"]["gpu"] is None
    printed = capsys.readouterr().out
    assert "test WGA" in printed and "oracle DFR" in printed

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    run = client.get_run(res["mlflow_run_id"])
    assert run.data.params["clustering.method"] == "spectral" and run.data.params["model.backbone"] == "test_resnet"
    assert run.data.metrics["robust.test.worst_group_acc"] == pytest.approx(res["robust"]["test"]["worst_group_acc"])
    assert "erm.train_loss" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"results.json", "group_accuracy.png", "heatmaps_by_pseudo_group.png", "spec.resolved.json"} <= artifacts
    assert (out / "group_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the same spec again: every stage comes from the cache, and the result is identical
    assert main(["run", str(_write_spec(tmp_path)), "--out", str(out), "--cache", str(cache), "--quiet"]) == 0
    again = json.loads((out / "results.json").read_text())
    # a reused clusters stage (both runs here) prints its pseudo groups as a computed one does: int ids,
    # not the strings its JSON record gives back
    lines = [l for l in (printed + capsys.readouterr().out).splitlines() if l.startswith("pseudo groups:")]
    assert len(lines) == 2 and lines[0] == lines[1] and all("sizes {0: " in l for l in lines), lines
    events = [(r["stage"], r["event"]) for r in StageCache(cache).records()[before:]]
    assert events.count(("erm", "reused")) == 2 and ("erm", "computed") not in events
    assert ("heatmaps", "computed") not in events and ("clusters", "reused") in events
    assert again["robust"]["test"] == res["robust"]["test"] and again["mlflow_run_id"] != res["mlflow_run_id"]


def test_run_folder_dataset_of_real_images(ray_local, tmp_path, folder_dataset):
    spec = _write_spec(
        tmp_path,
        dataset={
            "name": "folder",
            "root": str(folder_dataset),
            "image_size": 32,
            "decode_cache": str(tmp_path / "decoded"),
        },
        heatmaps={"method": "input_x_gradient", "shard_size": 8, "downsize": 8},
        clustering={"method": "kmeans", "k": 2, "scope": "local", "min_group_size": 2},
        erm={"epochs": 2, "batch_size": 8},
    )
    out = tmp_path / "run"
    assert main(["run", str(spec), "--out", str(out), "--quiet"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["erm"]["test"]["per_group"]) == {"y=0 place=0", "y=0 place=1", "y=1 place=0", "y=1 place=1"}
    assert res["robust"]["n_groups"] == 4
    H = np.load(next((out / "cache").glob("heatmaps-*/shard-00000.npy")))
    assert H.shape[1:] == (3, 8, 8)
    assert len(list((tmp_path / "decoded").glob("*.npy"))) == 2  # val and test decoded once, shared by all stages


@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", "clustering.kk=2"], "unknown spec key 'clustering.kk'. Did you mean 'k'?"),
        (
            ["--set", "heatmaps.method=shap"],
            "unknown heatmap method 'shap'. Registered: gradcam, input_x_gradient, integrated_gradients, lrp",
        ),
        (["--set", "model.backbone=resnet_999"], "'resnet_999' is not a timm model"),
        # the tiny spec's C-MNIST keys do not go with another dataset (test_bad_input: a folder root that is not there)
        (
            ["--set", "dataset.name=folder", "--set", "dataset.root=/nonexistent"],
            "is not a key of dataset 'folder': dataset(s) cmnist, cmnist_multi, zoo_blur",
        ),
    ],
)
def test_bad_input_stops_with_a_named_culprit(tmp_path, capsys, args, message):
    rc = main(["run", str(_write_spec(tmp_path)), "--out", str(tmp_path / "o")] + args)
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err
