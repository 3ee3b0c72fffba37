"""ERM through Ray Train: DDP over gloo with two CPU workers, checkpoints through ray.train.report,
validation sharded over the workers, best-val-accuracy checkpoint selection; bf16 autocast in the loop."""

import pytest
import torch
from torch.utils.data import DataLoader, Subset

from exmap_ray.data import build_dataset
from exmap_ray.data.base import Labeled
from exmap_ray.erm import accuracy, make_optimizer, train_epoch, train_erm
from exmap_ray.models import create_model, load_checkpoint
from exmap_ray.spec import from_dict
from exmap_ray.storage import read_json

from .conftest import tiny_spec_dict


def _val_acc(spec, model) -> float:
    """The val accuracy of `model` computed here, in one process, over the whole val split."""
    val = build_dataset(spec.dataset, spec.seed).val
    return accuracy(model, DataLoader(Labeled(val), batch_size=97), "cpu")


def test_ray_train_ddp_two_workers_hands_on_the_best_epoch(ray_local, tmp_path, caplog):
    """Two CPU workers (DDP over gloo), validation sharded over them, and `erm.keep: best_val_acc`.

    A learning rate high enough that val accuracy is not monotone over the epochs, so the best epoch
    is not the last: the weights handed on must be that epoch's, not the last ones."""
    spec = from_dict(
        tiny_spec_dict(erm={"epochs": 3, "num_workers": 2, "batch_size": 32, "lr": 0.05, "keep": "best_val_acc"})
    )
    caplog.set_level("INFO", logger="exmap_ray.console")  # the driver's epoch lines (console.Progress)
    info = train_erm(spec, tmp_path, n_classes=2)
    assert info["workers"] == 2 and info["epochs"] == 3 and not info["use_gpu"]
    hist = read_json(tmp_path / "history.json")
    assert [h["epoch"] for h in hist] == [1, 2, 3]
    # rank 0 sent each epoch's metrics to this driver, which printed them, once each, in order
    printed = [(r.tag, r.getMessage()) for r in caplog.records if r.name == "exmap_ray.console"]
    assert printed == [
        (
            "erm",
            f"epoch {h['epoch']}/3: loss {h['train_loss']:.4f}, train acc {h['train_acc']:.3f}, "
            f"val acc {h['val_acc']:.3f}, {h['images_per_s']:.0f} img/s per worker",
        )
        for h in hist
    ], printed
    accs = [h["val_acc"] for h in hist]
    best = accs.index(max(accs))  # the first epoch with the highest val accuracy
    assert best < 2, f"val accuracy peaked at the last epoch ({accs}): the test no longer tells best from last"
    assert info["kept_epoch"] == best + 1
    model = load_checkpoint("test_resnet", 2, tmp_path / "model.pt")
    assert model(torch.rand(2, 3, 28, 28)).shape == (2, 2)
    # each worker scored half of val; the all-reduced counts give the whole split's accuracy, and
    # model.pt is the best epoch's: its accuracy here, in one process, is that epoch's
    assert _val_acc(spec, model) == pytest.approx(accs[best], abs=1e-12)


def test_bf16_autocast_and_channels_last_train_on_cpu():
    """erm.precision bf16 runs on the CPU too (autocast exists there), and with channels_last; losses
    stay finite and the weights stay fp32. The training loop's own functions, without Ray Train (a Ray
    Train fit costs about 30 s of start-up here; the spec keys' way to the workers is the same dict that
    every other ERM test sends)."""
    spec = from_dict(tiny_spec_dict(erm={"precision": "bf16", "channels_last": True}))
    data = build_dataset(spec.dataset, spec.seed)
    runs = {}
    for precision in ("fp32", "bf16"):  # both channels_last, so that only the precision differs
        torch.manual_seed(0)
        net = create_model("test_resnet", 2).to(memory_format=torch.channels_last)
        opt = make_optimizer(net.parameters(), spec.erm)
        train = DataLoader(Subset(Labeled(data.train), range(128)), batch_size=64)  # two steps
        m = train_epoch(net, train, opt, "cpu", precision=precision, channels_last=True)
        val = accuracy(net, DataLoader(Subset(Labeled(data.val), range(128)), batch_size=64), "cpu", precision, True)
        runs[precision] = (m, val, {k: v.detach().clone() for k, v in net.state_dict().items()})
    m, val, state = runs["bf16"]
    assert torch.isfinite(torch.tensor(m["train_loss"])) and 0.0 <= m["train_acc"] <= 1 and 0.0 <= val <= 1.0
    assert all(v.dtype in (torch.float32, torch.int64) for v in state.values())
    # bf16 arithmetic really ran: from the same start, the same batches end in other weights than fp32's
    fp32 = runs["fp32"][2]
    assert any(not torch.equal(state[k], fp32[k]) for k in state if state[k].is_floating_point())
