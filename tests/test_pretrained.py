"""`model.pretrained` without the network: real checkpoint files (timm and torchvision state dicts,
.pt and .safetensors, HF hub cache folders) written here and loaded into real timm models."""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file

from exmap_ray.errors import UserError
from exmap_ray.models import create_model, find_weights, penultimate


def _source(name="test_resnet", classes=1000, seed=0):
    torch.manual_seed(seed)
    m = timm.create_model(name, pretrained=False, num_classes=classes)
    with torch.no_grad():  # non-trivial BatchNorm statistics, so a wrongly loaded buffer shows
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
    return m


def _same_backbone(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa if not k.startswith("fc."))


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_timm_state_dict_loads_and_head_is_fresh(tmp_path, fmt):
    src = _source()
    sd = {k: v.contiguous() for k, v in src.state_dict().items()}
    path = tmp_path / f"weights.{fmt}"
    if fmt == "pt":
        # a DDP training checkpoint
        torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, path)
    else:
        save_file(sd, str(path))
    model = create_model("test_resnet", 2, str(path))
    assert _same_backbone(model, src)
    assert model.fc.weight.shape == (2, src.fc.in_features)  # 1000-class head dropped, re-initialised for 2
    fresh = create_model("test_resnet", 2)
    assert not _same_backbone(fresh, src)
    # same class count: the head is loaded too
    same = create_model("test_resnet", 1000, str(path))
    assert torch.equal(same.fc.weight, src.fc.weight)


def test_torchvision_resnet50_loads_into_timm_resnet50(tmp_path):
    torch.manual_seed(0)
    tv = torchvision.models.resnet50(weights=None)
    with torch.no_grad():
        for mod in tv.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.1, 0.1)
    path = tmp_path / "resnet50-tv.pth"
    torch.save(tv.state_dict(), path)
    model = create_model("resnet50", 2, str(path)).eval()
    tv.fc = torch.nn.Identity()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():  # the same network: identical 2048-d features
        assert torch.allclose(penultimate(model, x), tv.eval()(x), atol=1e-5)
    assert model.fc.out_features == 2


def test_hub_cache_layouts_and_single_file_folders(tmp_path):
    src = _source()
    repo = tmp_path / "hub" / "models--timm--test_resnet.r160_in1k"
    snap = repo / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(snap / "model.safetensors"))
    assert find_weights(str(repo)) == snap / "model.safetensors"
    assert find_weights(str(tmp_path / "hub"), "test_resnet") == snap / "model.safetensors"  # the hub root
    assert _same_backbone(create_model("test_resnet", 3, str(tmp_path / "hub")), src)
    one = tmp_path / "one"
    one.mkdir()
    torch.save(src.state_dict(), one / "test_resnet-in1k.pth")
    assert _same_backbone(create_model("test_resnet", 3, str(one)), src)
    torch.save(src.state_dict(), one / "other.pt")
    with pytest.raises(
        UserError, match="holds 2 weight files \\(other.pt, test_resnet-in1k.pth\\); set model.pretrained"
    ):
        find_weights(str(one))


def test_weights_it_cannot_find_or_use_fail_with_names(tmp_path):
    with pytest.raises(UserError) as e:
        create_model("test_resnet", 2, str(tmp_path / "nope" / "w.pth"))
    assert f"model.pretrained: '{tmp_path / 'nope' / 'w.pth'}' does not exist" in str(e.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError) as e:
        create_model("test_resnet", 2, str(empty))
    msg = str(e.value)  # every place it looked
    for where in (empty / "model.safetensors", empty / "pytorch_model.bin", empty / "models--*--test_resnet[.*]"):
        assert str(where) in msg
    assert "never downloads" in msg
    # one renamed tensor: the missing and the unexpected key are both named
    sd = _source().state_dict()
    sd["layer1.0.conv1.kernel"] = sd.pop("layer1.0.conv1.weight")
    path = tmp_path / "renamed.pt"
    torch.save(sd, path)
    with pytest.raises(UserError) as e:
        create_model("test_resnet", 2, str(path))
    msg = str(e.value)
    assert (
        "does not fit timm 'test_resnet' (1 tensor(s) the model needs are missing: 'layer1.0.conv1.weight'; "
        "1 unexpected tensor(s): 'layer1.0.conv1.kernel')" in msg
    )
    # another architecture's weights (resnet18 into test_resnet): shapes differ and are named
    torch.save(_source("resnet18").state_dict(), path)
    with pytest.raises(UserError, match=r"of another shape: 'bn1.weight' \(64,\) vs \(32,\)"):
        create_model("test_resnet", 2, str(path))
    bad = tmp_path / "junk.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="junk.pth' cannot be read as a state dict"):
        create_model("test_resnet", 2, str(bad))
