"""ERM through Ray Train: DDP over gloo with two CPU workers, checkpoints through ray.train.report,
validation sharded over the workers, best-val-accuracy checkpoint selection, bf16 autocast."""
import pytest
import torch
from torch.utils.data import DataLoader

from exmap_ray.data import build_dataset
from exmap_ray.data.base import Labeled
from exmap_ray.erm import accuracy, train_erm
from exmap_ray.models import load_checkpoint
from exmap_ray.spec import from_dict
from exmap_ray.store import read_json

from .conftest import tiny_spec_dict


def _val_acc(spec, model) -> float:
    """The val accuracy of `model` computed here, in one process, over the whole val split."""
    val = build_dataset(spec.dataset, spec.seed).val
    return accuracy(model, DataLoader(Labeled(val), batch_size=97), "cpu")


def test_ray_train_ddp_two_workers(ray_local, tmp_path):
    spec = from_dict(tiny_spec_dict(erm={"epochs": 2, "num_workers": 2, "batch_size": 32}))
    info = train_erm(spec, tmp_path, n_classes=2)
    assert info["workers"] == 2 and info["epochs"] == 2 and not info["use_gpu"] and info["kept_epoch"] == 2
    hist = read_json(tmp_path / "history.json")
    assert [h["epoch"] for h in hist] == [1, 2]
    assert hist[-1]["train_loss"] < hist[0]["train_loss"] or hist[-1]["train_acc"] > 0.8
    model = load_checkpoint("test_resnet", 2, tmp_path / "model.pt")
    assert model(torch.rand(2, 3, 28, 28)).shape == (2, 2)
    # each worker scored half of val; the all-reduced counts give the whole split's accuracy
    assert hist[-1]["val_acc"] == pytest.approx(_val_acc(spec, model), abs=1e-12)


def test_keep_best_val_acc_hands_on_the_best_epoch(ray_local, tmp_path):
    # a learning rate high enough that val accuracy is not monotone over the epochs
    spec = from_dict(tiny_spec_dict(erm={"epochs": 4, "batch_size": 64, "lr": 0.05, "keep": "best_val_acc"}))
    info = train_erm(spec, tmp_path, n_classes=2)
    accs = [h["val_acc"] for h in read_json(tmp_path / "history.json")]
    best = accs.index(max(accs))  # the first epoch with the highest val accuracy
    assert info["kept_epoch"] == best + 1
    model = load_checkpoint("test_resnet", 2, tmp_path / "model.pt")
    assert _val_acc(spec, model) == pytest.approx(accs[best], abs=1e-12)


def test_bf16_autocast_and_channels_last_train_on_cpu(ray_local, tmp_path):
    """erm.precision bf16 runs on the CPU too (autocast exists there); losses stay finite."""
    spec = from_dict(tiny_spec_dict(erm={"epochs": 1, "batch_size": 64, "precision": "bf16",
                                         "channels_last": True}))
    train_erm(spec, tmp_path, n_classes=2)
    (h,) = read_json(tmp_path / "history.json")
    assert torch.isfinite(torch.tensor(h["train_loss"])) and 0.0 <= h["val_acc"] <= 1.0
    model = load_checkpoint("test_resnet", 2, tmp_path / "model.pt")
    assert all(v.dtype in (torch.float32, torch.int64) for v in model.state_dict().values())
