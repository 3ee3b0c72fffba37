"""Faults 1 and 2: a Ray Train worker and a heatmap actor are SIGKILLed mid-stage on a real local Ray.

ERM must resume from its last checkpoint (not from epoch 0) and reach the same quality; extraction
must redo the lost shard elsewhere and end with every val image exactly once, equal to an
undisturbed run.
"""

import numpy as np
import torch

from exmap_ray.data import build_dataset
from exmap_ray.erm import train_erm
from exmap_ray.heatmaps import HEATMAP_METHODS
from exmap_ray.heatmaps.extract import HeatmapShards, extract, extract_with_actors
from exmap_ray.models import create_model, save_checkpoint
from exmap_ray.spec import from_dict
from exmap_ray.storage import read_json

from ..conftest import tiny_spec_dict
from .helpers import KillWhen, files


def test_erm_worker_killed_resumes_from_checkpoint(ray_local, tmp_path):
    spec = from_dict(tiny_spec_dict(dataset={"n_train": 500}, erm={"epochs": 3, "batch_size": 32}))

    def committed() -> bool:
        # a checkpoint counts once the controller has recorded it (a folder alone may be half-reported)
        snap = files(tmp_path / "hit" / "ray_train", "**/checkpoint_manager_snapshot.json")
        return any("checkpoint_" in s.read_text() for s in snap)

    killer = KillWhen("RayTrainWorker", committed)
    killer.start()
    hit = train_erm(spec, tmp_path / "hit", n_classes=2)
    killer.stop.set()
    assert killer.killed, "the worker was never killed: ERM finished before a checkpoint was committed"

    hist = read_json(tmp_path / "hit" / "history.json")
    assert [h["epoch"] for h in hist] == [1, 2, 3]  # every epoch once: no restart from epoch 0
    resumed = [h["resumed_from"] for h in hist]
    assert resumed[0] == 0 and max(resumed) >= 1, f"no epoch ran after a resume: {resumed}"
    assert hit["epochs"] == 3

    clean = undisturbed_val_acc(spec)
    # equal in quality: the resumed model is as good on val as the undisturbed one
    assert abs(hist[-1]["val_acc"] - clean) <= 0.05, (hist[-1], clean)


def undisturbed_val_acc(spec) -> float:
    """The last epoch's val accuracy of the same training loop left alone: Ray Train's local mode
    (num_workers=0) runs `train_loop` in this process, without the start-up of a worker group."""
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    from exmap_ray.erm import train_loop

    threads = torch.get_num_threads()  # train_loop sets its worker's thread count: here, this process's
    try:
        result = TorchTrainer(
            train_loop,
            train_loop_config={"spec": spec.to_dict(), "threads": 1},
            scaling_config=ScalingConfig(num_workers=0),
        ).fit()
    finally:
        torch.set_num_threads(threads)
    assert result.metrics["epoch"] == spec.erm.epochs and result.metrics["resumed_from"] == 0
    return result.metrics["val_acc"]


def test_heatmap_actor_killed_shards_redone(ray_local, tmp_path):
    spec = from_dict(
        tiny_spec_dict(dataset={"n_val": 1200}, heatmaps={"shard_size": 30, "num_actors": 2, "batch_size": 10})
    )
    data = build_dataset(spec.dataset, spec.seed)
    torch.manual_seed(0)
    model = create_model(spec.model.backbone, data.n_classes).eval()
    save_checkpoint(model, tmp_path / "model.pt")
    out = tmp_path / "hm"
    out.mkdir()
    killer = KillWhen("HeatmapWorker", lambda: bool(files(out, "shard-*.npy")))
    killer.start()
    info = extract_with_actors(spec, tmp_path / "model.pt", len(data.val), out)
    killer.stop.set()
    assert killer.killed and info["actors_lost"] >= 1, ("no actor died mid-extraction", info)

    store = HeatmapShards(out)
    starts = sorted(s["start"] for s in store.index["shards"])
    assert starts == list(range(0, 1200, 30))  # every shard exactly once: no gap, no duplicate
    assert len(store) == 1200 == sum(s["stop"] - s["start"] for s in store.index["shards"])
    method = HEATMAP_METHODS.get("lrp")(model, spec.heatmaps)
    maps, preds, _, _ = extract(method, data.val.images, 10, spec.heatmaps.downsize)
    np.testing.assert_allclose(store.load(), maps, rtol=1e-4, atol=1e-7)  # equal to an undisturbed run
    np.testing.assert_array_equal(store.preds(), preds)
