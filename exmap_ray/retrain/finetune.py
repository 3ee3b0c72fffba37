"""End-to-end retraining (`retrain.mode: end_to_end`): fine-tune the whole network with group labels.

    res = finetune(model, val_images, y_val, groups, objective="groupdro", eta=0.01, lr=1e-4,
                   weight_decay=1e-4, epochs=1, batch_size=64, seed=0)
    pred = res.predict(test_images)

The given model is copied, never changed in place. Objectives: "groupdro" is Sagawa et al.'s
online GroupDRO (per batch: q_g <- q_g exp(eta l_g), normalise, descend sum_g q_g l_g); "upweight"
is JTT's second stage, a per-sample weighted cross-entropy (weights, e.g. lambda_up on the error set,
are passed in). SGD with momentum 0.9 and weight decay, as in both papers; BatchNorm in train mode.
`finetune_with` reads the spec's `retrain.end_to_end` keys and the method's own (eta, upweight).
Images are a torch Dataset of (C, H, W) tensors or an (N, C, H, W) tensor; labels and groups are
numpy arrays. There is no hyperparameter selection
here: end-to-end runs are costly, so it is left to a sweep on the label-free held-out metrics.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

log = logging.getLogger(__name__)


class _Indexed(Dataset):
    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], i


@dataclass
class FinetuneResult:
    model: nn.Module  # the fine-tuned copy (eval mode)
    q: np.ndarray | None  # final GroupDRO group weights, in sorted group-id order (None for upweight)
    losses: list[float] = field(default_factory=list)  # the objective per step
    steps: int = 0

    @torch.no_grad()
    def predict(self, images, batch_size: int = 256, device: str = "cpu") -> np.ndarray:
        self.model.eval()
        preds = [self.model(x.to(device)).argmax(1).cpu() for x in DataLoader(images, batch_size=batch_size)]
        return torch.cat(preds).numpy()


def finetune(
    model: nn.Module,
    images,
    y: np.ndarray,
    groups: np.ndarray,
    *,
    objective: str = "groupdro",
    eta: float = 0.01,
    weights: np.ndarray | None = None,
    lr: float = 1e-4,
    weight_decay: float = 1e-4,
    epochs: int = 1,
    batch_size: int = 64,
    seed: int = 0,
    max_steps: int | None = None,
    device: str = "cpu",
) -> FinetuneResult:
    """Fine-tune a copy of `model` on (images, y) with `groups`; `max_steps` caps the steps (tests, smoke runs)."""
    if objective not in ("groupdro", "upweight"):
        raise ValueError(f"objective must be 'groupdro' or 'upweight', got {objective!r}")
    if objective == "upweight" and weights is None:
        raise ValueError("objective 'upweight' needs per-sample weights")
    torch.manual_seed(seed)
    net = copy.deepcopy(model).to(device).train()
    gids, gi = np.unique(groups, return_inverse=True)
    yt, gt = torch.as_tensor(y, dtype=torch.long), torch.as_tensor(gi, dtype=torch.long)
    wt = torch.as_tensor(weights, dtype=torch.float32) if weights is not None else None
    q = torch.full((len(gids),), 1.0 / len(gids))
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    # drop a ragged last batch (a batch of one breaks BatchNorm in train mode) unless that is all there is
    loader = DataLoader(
        _Indexed(images),
        batch_size=batch_size,
        shuffle=True,
        drop_last=len(images) > batch_size,
        generator=torch.Generator().manual_seed(seed),
    )
    losses, step = [], 0
    for _ in range(epochs):
        for x, idx in loader:
            nll = F.cross_entropy(net(x.to(device)), yt[idx].to(device), reduction="none")
            if objective == "groupdro":
                g = gt[idx].to(device)
                counts = torch.bincount(g, minlength=len(gids)).float()
                group_loss = torch.zeros(len(gids), device=device).index_add(0, g, nll) / counts.clamp(min=1)
                with torch.no_grad():
                    q = q.to(device) * torch.exp(eta * group_loss.detach() * (counts > 0))
                    q = q / q.sum()
                loss = (q * group_loss).sum()
            else:
                w = wt[idx].to(device)
                loss = (w * nll).sum() / w.sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            step += 1
            if max_steps is not None and step >= max_steps:
                break
        if max_steps is not None and step >= max_steps:
            break
    log.info("end-to-end %s: %d steps, last loss %.4f", objective, step, losses[-1] if losses else float("nan"))
    return FinetuneResult(net.eval(), q.cpu().numpy() if objective == "groupdro" else None, losses, step)


def finetune_with(
    method: str,
    model: nn.Module,
    images,
    y: np.ndarray,
    groups: np.ndarray,
    r,
    seed: int,
    max_steps: int | None = None,
    device: str = "cpu",
) -> FinetuneResult:
    """`method` groupdro or jtt; `r` its `RetrainConfig`: its own keys (retrain.groupdro.eta,
    retrain.jtt.upweight) and the fine-tune's, `r.end_to_end` (retrain.end_to_end)."""
    e2e = r.end_to_end
    common = dict(
        lr=e2e.lr,
        weight_decay=e2e.weight_decay,
        epochs=e2e.epochs,
        batch_size=e2e.batch_size,
        seed=seed,
        max_steps=max_steps,
        device=device,
    )
    if method == "groupdro":
        return finetune(model, images, y, groups, objective="groupdro", eta=r.eta, **common)
    if method == "jtt":
        from .common import error_set_from_groups

        weights = np.where(error_set_from_groups(y, groups), r.upweight, 1.0)
        return finetune(model, images, y, groups, objective="upweight", weights=weights, **common)
    raise ValueError(f"no end-to-end mode for retrain.method '{method}'")
