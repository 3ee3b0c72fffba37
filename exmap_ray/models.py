"""timm backbones: create by name, load local weights, split features from the head.

Every timm model has `forward_features` and `forward_head(pre_logits=True)`;
DFR retrains on the pre-logit features and the heatmap methods use the whole
model. Weights are never downloaded: `model.pretrained` must be a local file
(a timm / torchvision state dict, or .safetensors) or a folder holding one.
"""
from __future__ import annotations

import difflib
import logging
from pathlib import Path

import numpy as np
import timm
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .errors import SpecError, UserError

log = logging.getLogger(__name__)
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")


def create_model(backbone: str, n_classes: int, pretrained: str | None = None) -> nn.Module:
    if not timm.is_model(backbone):
        near = difflib.get_close_matches(backbone, timm.list_models(), n=3)
        hint = f" Close names: {', '.join(near)}." if near else ""
        raise SpecError(f"spec key 'model.backbone': '{backbone}' is not a timm model.{hint} "
                        f"`python -c \"import timm; print(timm.list_models('resnet*'))\"` lists them")
    model = timm.create_model(backbone, pretrained=False, num_classes=n_classes)
    if pretrained:
        load_pretrained(model, pretrained)
    return model


def _read_state_dict(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    sd = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "model_state"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    return {k.removeprefix("module."): v for k, v in sd.items()}


def load_pretrained(model: nn.Module, where: str) -> None:
    """Load backbone weights from a local file or folder; the classifier head stays fresh."""
    path = Path(where).expanduser()
    if path.is_dir():
        found = [path / n for n in WEIGHT_FILES if (path / n).is_file()]
        if not found:
            raise UserError(f"model.pretrained: no weights in folder '{path}' (looked for {', '.join(WEIGHT_FILES)})")
        path = found[0]
    if not path.is_file():
        raise UserError(f"model.pretrained: '{path}' does not exist; exmap-ray never downloads weights, "
                        f"so give a local state dict, .safetensors file or hub cache folder")
    sd = _read_state_dict(path)
    head = model.default_cfg.get("classifier", "fc")
    own = model.state_dict()
    sd = {k: v for k, v in sd.items() if not k.startswith(head + ".") and k in own and v.shape == own[k].shape}
    missing = [k for k in own if k not in sd and not k.startswith(head + ".")]
    if missing:
        raise UserError(f"model.pretrained: '{path}' does not fit '{type(model).__name__}': "
                        f"{len(missing)} backbone tensors missing, e.g. '{missing[0]}'")
    model.load_state_dict(sd, strict=False)
    log.info("loaded pretrained backbone from %s (%d tensors)", path, len(sd))


def penultimate(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.forward_head(model.forward_features(x), pre_logits=True)


@torch.no_grad()
def embed(model: nn.Module, images: Dataset, batch_size: int = 512, device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """(penultimate features, logits) of a frozen model over a dataset of images."""
    model.eval().to(device)
    feats, logits = [], []
    for x in DataLoader(images, batch_size=batch_size, shuffle=False):
        f = penultimate(model, x.to(device))
        feats.append(f.float().cpu())
        logits.append(model.get_classifier()(f).float().cpu())
    return torch.cat(feats).numpy(), torch.cat(logits).numpy()


def save_checkpoint(model: nn.Module, path: Path) -> None:
    from .store import atomic_path
    with atomic_path(path) as tmp:
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)


def load_checkpoint(backbone: str, n_classes: int, path: Path) -> nn.Module:
    model = create_model(backbone, n_classes)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()
