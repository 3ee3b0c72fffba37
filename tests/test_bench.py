"""The method zoo end to end: cmnist_multi, per-shortcut gaps, `bench`, and baselines through `run`."""

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from exmap_ray.bench import E2E_ROWS, ROWS, dpe_rows, format_per_seed, peer_rows, run_bench
from exmap_ray.data import build_dataset
from exmap_ray.metrics import shortcut_gaps
from exmap_ray.pipeline import format_table, run_pipeline
from exmap_ray.spec import from_dict
from exmap_ray.cache import StageCache

from .conftest import tiny_spec_dict


def test_cmnist_multi_has_two_shortcuts_and_eight_groups():
    spec = from_dict(
        {
            "dataset": {
                "name": "cmnist_multi",
                "rho": 0.95,
                "rho_patch": 0.9,
                "n_train": 600,
                "n_val": 400,
                "n_test": 400,
            }
        }
    )
    d = build_dataset(spec.dataset, 0)
    assert d.n_groups == 8 and len(d.group_names) == 8
    for split in ("train", "val", "test"):
        s = d.split(split)
        assert (np.bincount(s.group, minlength=8) >= 2).all(), split  # every group present everywhere
        x = s.images.x
        tl, br = s.attrs["patch"] == 0, s.attrs["patch"] == 1
        assert (x[tl][:, :, :4, :4] == 1).all() and (x[br][:, :, -4:, -4:] == 1).all()
    v, t = d.val, d.test
    assert 0.85 <= (v.attrs["patch"] == v.y).mean() <= 0.95 and 0.9 <= (v.attrs["colour"] == v.y).mean()
    assert abs((t.attrs["patch"] == t.y).mean() - 0.5) < 0.02 and abs((t.attrs["colour"] == t.y).mean() - 0.5) < 0.02
    # a model that follows the colour fails exactly where the colour disagrees
    gaps = d.shortcut_metrics(t.attrs["colour"], t.y, t.attrs)
    assert gaps["id_acc"] == 1.0 and gaps["colour_gap"] == -1.0 and gaps["patch_gap"] == 0.0


def test_shortcut_gaps_by_hand():
    y = np.array([0, 0, 1, 1, 0, 1])
    pred = np.array([0, 0, 1, 0, 1, 1])
    a = {"bg": np.array([1, 1, 1, 0, 1, 0], bool), "obj": np.array([1, 1, 1, 1, 0, 0], bool)}
    g = shortcut_gaps(pred, y, a)
    assert g["id_acc"] == 1.0 and g["bg_gap"] == -1.0 and g["obj_gap"] == -1.0 and g["bg+obj_gap"] == 0.0


E2E = {
    "n_select_repeats": 2,
    "groupdro": {"epochs": 5, "batch_size": 32},
    "end_to_end": {"lr": 0.05, "epochs": 2, "batch_size": 32},
}


def test_run_with_end_to_end_groupdro(tiny_run, tmp_path):
    """retrain.mode end_to_end through `run`: a cached stage that fine-tunes a copy of the ERM network."""
    cache = tiny_run[0] / "cache"
    before = len(StageCache(cache).records())
    spec = from_dict(
        tiny_spec_dict(
            retrain={**E2E, "method": "groupdro", "mode": "end_to_end", "groupdro": {**E2E["groupdro"], "eta": 1.0}}
        )
    )
    res = run_pipeline(spec, tmp_path / "run", cache)
    e = res["robust"]
    assert e["retrain"] == "groupdro" and e["retrain_mode"] == "end_to_end"
    assert 0 <= e["test"]["worst_group_acc"] <= e["test"]["mean_acc"] <= 1
    v = e["val"]  # label-free metrics on the held-out half, for sweeps
    assert all(0 <= v[k] <= 1 for k in ("worst_pseudo_group_acc", "worst_class_acc", "oracle_worst_group_acc"))
    recs = StageCache(cache).records()[before:]
    ft = [r for r in recs if r["stage"] == "end_to_end"]
    assert [r["event"] for r in ft] == ["computed"]
    stage_dir = Path(res["cache"]["end_to_end"]["dir"])
    assert (stage_dir / "test_pred.npy").exists() and np.load(stage_dir / "heldout_idx.npy").shape == (1, 150)
    info = e["end_to_end"]
    assert info["steps"]["full"] == 2 * (300 // 32) and info["steps"]["half"] == 2 * (150 // 32)
    # fine-tuned in a Ray task (a worker process of this Ray node), not in this driver
    import ray

    assert info["process"]["ray_worker"] and info["process"]["pid"] != os.getpid()
    assert info["process"]["node_id"] == ray.get_runtime_context().get_node_id() and info["device"] == "cpu"
    q = np.array(info["q"])  # GroupDRO's group weights moved off uniform, toward the hardest pseudo group
    assert q.sum() == pytest.approx(1.0, abs=1e-5) and q.max() > 1.5 / len(q)
    # the fine-tune moved the network. Not asserted on its test predictions: the tiny ERM can predict one
    # class for every test image, and so can the fine-tuned copy (seen in CI), though its weights moved
    assert 1e-4 < info["weight_change"] < 1.0
    assert "GroupDRO (end to end)" in format_table(res)
    with np.load(tmp_path / "run" / "selection.npz") as sel:
        assert sel["heldout_idx"].shape == sel["heldout_pred"].shape == (1, 150)
    again = run_pipeline(spec, tmp_path / "again", cache)  # a rerun reads the fine-tune from the cache
    assert ("end_to_end", "reused") in [(r["stage"], r["event"]) for r in StageCache(cache).records()]
    assert again["robust"]["test"] == res["robust"]["test"]


def test_per_seed_table_lists_each_seed_and_leaves_gaps_blank():
    per_seed = [
        {"row": "ERM", "seed": 0, "test_wga": 0.1, "n_groups": None},
        {"row": "ERM", "seed": 1, "test_wga": 0.2, "n_groups": None},
        {"row": "ExMap global + DFR", "seed": 0, "test_wga": 0.75, "n_groups": 4, "worst_recovery": 1.0},
    ]
    lines = format_per_seed(per_seed).splitlines()
    assert lines[0] == "| method | seed 0 | seed 1 |"
    assert lines[2] == "| ERM | 0.100 | 0.200 |"
    assert lines[3] == "| ExMap global + DFR | 0.750 (4 groups, recovery 1.00) |  |"  # seed 1 missing: blank


def test_bench_table_shares_the_upstream(tiny_run, tmp_path):
    cache = tiny_run[0] / "cache"
    before = len(StageCache(cache).records())
    spec = from_dict(tiny_spec_dict(retrain=E2E))
    out = tmp_path / "bench"
    summary = run_bench(spec, [0], out, cache, end_to_end=True)
    rows = {r["row"]: r for r in summary["rows"]}
    # what computed it: the driver's packages, and those of the process that trained seed 0's ERM
    import torch

    env = json.loads((out / "bench.json").read_text())["environment"]
    assert env["driver"]["packages"]["torch"] == torch.__version__ == env["erm"]["0"]["packages"]["torch"]
    assert f"ERM trained with: torch {torch.__version__}, " in (out / "bench.md").read_text()
    # peers: with SpuCo installed; DPE: with dpe installed
    assert list(rows) == [name for name, *_ in ROWS + peer_rows() + dpe_rows() + E2E_ROWS]
    assert rows["oracle DFR (true groups)"]["ari"] == 1.0
    for r in rows.values():
        assert 0 <= r["test_wga"] <= r["test_mean_acc"] <= 1
    assert rows["ExMap + GroupDRO (end to end)"]["ari"] == rows["ExMap global + DFR"]["ari"]  # the same groups
    new = [(r["stage"], r["event"]) for r in StageCache(cache).records()[before:]]
    assert ("erm", "reused") in new and ("erm", "computed") not in new  # ERM once per seed, shared by rows
    assert ("heatmaps", "computed") not in new
    # with the run test's retrain keys (its groupdro.eta aside) both rows fine-tune here, once each
    assert new.count(("end_to_end", "computed")) == 2
    with open(out / "bench.csv") as f:
        assert len(list(csv.DictReader(f))) == len(ROWS) + len(peer_rows()) + len(dpe_rows()) + len(E2E_ROWS)
    md = (out / "bench.md").read_text()
    exmap = next(r for r in summary["per_seed"] if r["row"] == "ExMap global + DFR")
    assert f"| ExMap global + DFR | {exmap['test_wga']:.3f} ({exmap['n_groups']} groups, recovery " in md  # per seed
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    run = client.get_run(summary["mlflow_run_id"])
    assert {"bench.md", "bench.csv", "bench_wga.png"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    assert any(k.endswith("test_wga") for k in run.data.metrics)


def test_run_with_feature_groups_and_groupdro(tiny_run, tmp_path):
    spec = from_dict(
        tiny_spec_dict(
            groups={"source": "features"},
            clustering={"k": 2},
            retrain={"method": "groupdro", "groupdro": {"epochs": 5}, "n_select_repeats": 2},
        )
    )
    res = run_pipeline(spec, tmp_path / "run", tiny_run[0] / "cache")
    e = res["robust"]
    assert e["groups_source"] == "features" and e["retrain"] == "groupdro" and "weight_decay" in e["retrain_chosen"]
    assert e["n_groups"] == 4 and 0 <= e["test"]["worst_group_acc"] <= 1
    assert (tmp_path / "run" / "heatmaps_by_pseudo_group.png").exists()
