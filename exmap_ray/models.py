"""timm backbones: create by name, load local weights, split features from the head.

Every timm model has `forward_features` and `forward_head(pre_logits=True)`;
DFR retrains on the pre-logit features and the heatmap methods use the whole
model. Weights are never downloaded: `model.pretrained` must be a local file
(a timm / torchvision state dict, or .safetensors), a HF hub cache folder or a
folder holding one weights file (`find_weights` lists every place it looked).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .errors import SpecError, UserError, near_names

log = logging.getLogger(__name__)
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".pth.tar", ".ckpt")


def create_model(backbone: str, n_classes: int, pretrained: str | None = None) -> nn.Module:
    import timm  # here, not at the top: timm imports torchvision (seconds), which a process that builds no model
    # (a sweep's trial on cached stages, the clustering task) never needs

    if not timm.is_model(backbone):
        near = near_names(backbone, timm.list_models(), n=3)
        hint = f" Close names: {', '.join(near)}." if near else ""
        raise SpecError(
            f"spec key 'model.backbone': '{backbone}' is not a timm model.{hint} "
            f"`python -c \"import timm; print(timm.list_models('resnet*'))\"` lists them"
        )
    model = timm.create_model(backbone, pretrained=False, num_classes=n_classes)
    if pretrained is not None:  # never silently from scratch: a path that is set must load
        load_pretrained(model, pretrained, backbone)
    return model


def _read_state_dict(path: Path) -> dict:
    """A state dict from .safetensors or a torch file; unwraps training checkpoints and DDP prefixes."""
    try:
        if path.name.endswith(".safetensors"):
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - corrupt file, a pickled whole model, a foreign format
        raise UserError(
            f"model.pretrained: '{path}' cannot be read as a state dict ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200]}); give a timm/torchvision state dict "
            f"(.pth/.pt/.bin) or a .safetensors file"
        ) from None
    for key in ("state_dict", "model", "model_state", "model_state_dict"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(
            f"model.pretrained: '{path}' holds no state dict of tensors (found "
            f"{type(sd).__name__}); give a timm/torchvision state dict or a .safetensors file"
        )
    return {k.removeprefix("module."): v for k, v in sd.items()}


def _snapshot_weights(repo: Path, looked: list[str]) -> Path | None:
    """A weights file in a HF hub cache repo folder (models--ORG--NAME): refs/main's snapshot first."""
    snaps = repo / "snapshots"
    if not snaps.is_dir():
        return None
    ref = repo / "refs" / "main"
    revs = [snaps / ref.read_text().strip()] if ref.is_file() else []
    revs += sorted(
        (d for d in snaps.iterdir() if d.is_dir() and d not in revs), key=lambda d: d.stat().st_mtime, reverse=True
    )
    for rev in revs:
        for n in WEIGHT_FILES:
            looked.append(str(rev / n))
            if (rev / n).is_file():
                return rev / n
    return None


def find_weights(where: str, backbone: str | None = None) -> Path:
    """The weights file `model.pretrained` means: a file; a folder holding model.safetensors /
    pytorch_model.bin; a HF hub cache repo folder (models--timm--NAME, its snapshots); a hub cache
    root holding models--*--BACKBONE[.tag]; or a folder with exactly one weights file. Raises a
    UserError listing every place it looked."""
    path = Path(where).expanduser()
    looked: list[str] = [str(path)]
    if path.is_file():
        return path
    if path.is_dir():
        for n in WEIGHT_FILES:
            looked.append(str(path / n))
            if (path / n).is_file():
                return path / n
        hit = _snapshot_weights(path, looked)
        if hit is not None:
            return hit
        if backbone:
            repos = sorted(
                d
                for d in path.iterdir()
                if d.is_dir()
                and d.name.startswith("models--")
                and (d.name.split("--")[-1] == backbone or d.name.split("--")[-1].startswith(backbone + "."))
            )
            looked.append(str(path / f"models--*--{backbone}[.*]"))
            if len(repos) > 1:
                raise UserError(
                    f"model.pretrained: '{path}' holds several hub caches for '{backbone}': "
                    f"{', '.join(d.name for d in repos)}; set model.pretrained to the one you mean"
                )
            for repo in repos:
                hit = _snapshot_weights(repo, looked)
                if hit is not None:
                    return hit
        files = sorted(f for f in path.iterdir() if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES))
        looked.append(str(path / ("*{" + ",".join(WEIGHT_SUFFIXES) + "}")))
        if len(files) == 1:
            return files[0]
        if len(files) > 1:
            raise UserError(
                f"model.pretrained: folder '{path}' holds {len(files)} weight files "
                f"({', '.join(f.name for f in files)}); set model.pretrained to one of them"
            )
        raise UserError(
            f"model.pretrained: no weights found for '{where}'. Looked at: {'; '.join(looked)}. "
            f"exmap-ray never downloads weights; fetch them once elsewhere, e.g. "
            f"`huggingface-cli download timm/resnet50.tv_in1k` (then point at its "
            f"models--timm--resnet50.tv_in1k folder) or torchvision's resnet50 .pth file"
        )
    raise UserError(
        f"model.pretrained: '{path}' does not exist; exmap-ray never downloads weights, so give a "
        f"local state dict (.pth/.pt/.bin), .safetensors file or hub cache folder. Looked at: {path}"
        + (f" (its folder '{path.parent}' does not exist either)" if not path.parent.exists() else "")
    )


def _names(keys, n: int = 8) -> str:
    keys = list(keys)
    return ", ".join(f"'{k}'" for k in keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def load_pretrained(model: nn.Module, where: str, backbone: str | None = None) -> Path:
    """Load local weights into a timm model; returns the file used.

    Key names must match the model's: timm and torchvision ResNets share them. The classifier head
    is loaded only when its shape fits (same class count); otherwise it stays freshly initialised.
    Any other missing, unexpected or mis-shaped tensor is an error naming them (BatchNorm's
    num_batches_tracked counters may be absent, as in old torchvision files).
    """
    path = find_weights(where, backbone)
    sd = _read_state_dict(path)
    own = model.state_dict()
    heads = model.default_cfg.get("classifier", "fc")
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    is_head = lambda k: any(k == h or k.startswith(h + ".") for h in heads)  # noqa: E731
    head_skipped = [k for k in sd if is_head(k) and (k not in own or sd[k].shape != own[k].shape)]
    sd = {k: v for k, v in sd.items() if k not in head_skipped}
    unexpected = [k for k in sd if k not in own]
    shapes = [
        f"'{k}' {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in sd if k in own and sd[k].shape != own[k].shape
    ]
    missing = [k for k in own if k not in sd and not is_head(k) and not k.endswith("num_batches_tracked")]
    if unexpected or shapes or missing:
        parts = []
        if missing:
            parts.append(f"{len(missing)} tensor(s) the model needs are missing: {_names(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensor(s): {_names(unexpected)}")
        if shapes:
            parts.append(f"{len(shapes)} of another shape: {', '.join(shapes[:8])}")
        raise UserError(
            f"model.pretrained: '{path}' does not fit timm "
            f"'{model.default_cfg.get('architecture', type(model).__name__)}' "
            f"({'; '.join(parts)}). Is it the weights of another architecture than model.backbone?"
        )
    model.load_state_dict(sd, strict=False)
    log.info(
        "loaded pretrained weights from %s (%d tensors%s)",
        path,
        len(sd),
        f"; classifier re-initialised for {model.num_classes} classes" if head_skipped else "",
    )
    return path


def resolved_precision(device_type: str, precision: str) -> str:
    """'bf16' or 'fp32': what a `precision` spec key means on a device ('auto': bf16 on CUDA only)."""
    return "bf16" if precision == "bf16" or (precision == "auto" and device_type == "cuda") else "fp32"


def autocast(device_type: str, precision: str = "fp32"):
    """The autocast context of a `precision` spec key: bf16 for 'bf16', and for 'auto' on CUDA; else none.

    'auto' keeps fp32 on the CPU, where bf16 is slower on most cores and the figures stay as they were."""
    if resolved_precision(device_type, precision) == "bf16":
        return torch.autocast(device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def penultimate(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.forward_head(model.forward_features(x), pre_logits=True)


@torch.no_grad()
def embed(
    model: nn.Module,
    images: Dataset,
    batch_size: int = 512,
    device: str = "cpu",
    loader_kwargs: dict | None = None,
    precision: str = "auto",
) -> tuple[np.ndarray, np.ndarray]:
    """(penultimate features, logits) of a frozen model over a dataset of images, both fp32.

    `loader_kwargs` (workers, pinned memory) come from `data.base.loader_options(spec.dataset)`;
    `precision` is a spec precision key (auto: bf16 autocast on CUDA, fp32 on CPU)."""
    model.eval().to(device)
    feats, logits = [], []
    dev = torch.device(device)
    for x in DataLoader(images, batch_size=batch_size, shuffle=False, **(loader_kwargs or {})):
        with autocast(dev.type, precision):
            f = penultimate(model, x.to(device, non_blocking=True))
            out = model.get_classifier()(f)
        feats.append(f.float().cpu())
        logits.append(out.float().cpu())
    return torch.cat(feats).numpy(), torch.cat(logits).numpy()


def save_checkpoint(model: nn.Module, path) -> None:
    """To a local path or a storage location (storage.Loc), atomically."""
    from .storage import Loc

    with Loc.parse(path).writer() as f:
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, f)


def load_checkpoint(backbone: str, n_classes: int, path) -> nn.Module:
    """From a local path or a storage location (read through the node-local cache when remote)."""
    from .storage import Loc

    model = create_model(backbone, n_classes)
    model.load_state_dict(torch.load(Loc.parse(path).local_copy(), map_location="cpu", weights_only=True))
    return model.eval()
