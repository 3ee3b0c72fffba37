"""ERM through Ray Train: DDP over gloo with two CPU workers, checkpoints through ray.train.report."""
import torch

from exmap_ray.erm import train_erm
from exmap_ray.models import load_checkpoint
from exmap_ray.spec import from_dict
from exmap_ray.store import read_json

from .conftest import tiny_spec_dict


def test_ray_train_ddp_two_workers(ray_local, tmp_path):
    spec = from_dict(tiny_spec_dict(erm={"epochs": 2, "num_workers": 2, "batch_size": 32}))
    info = train_erm(spec, tmp_path, n_classes=2)
    assert info["workers"] == 2 and info["epochs"] == 2 and not info["use_gpu"]
    hist = read_json(tmp_path / "history.json")
    assert [h["epoch"] for h in hist] == [1, 2]
    assert hist[-1]["train_loss"] < hist[0]["train_loss"] or hist[-1]["train_acc"] > 0.8
    model = load_checkpoint("test_resnet", 2, tmp_path / "model.pt")
    assert model(torch.rand(2, 3, 28, 28)).shape == (2, 2)
