"""`retrain.mode: end_to_end` as a pipeline stage: fine-tune the whole ERM network on val images.

    info = run_end_to_end(spec, model, val_images, y_val, groups, test_images, seed, out_dir)

Two fine-tunes of copies of the ERM model, both with the (pseudo) groups only:
1. on one random half of val, scored on the other half. The half comes from the same random
   stream as DFR's first selection half (`default_rng([seed, 0])`), so the label-free held-out
   metrics of end-to-end and last-layer trials in a sweep are measured on the same points;
2. on all of val: the final model, whose test predictions are saved.

There is no hyperparameter choice inside (a fine-tune is costly); the held-out metrics let a sweep
choose `retrain.end_to_end.lr`, `epochs` and the rest without true groups. Writes `test_pred.npy`,
`heldout_idx.npy` and `heldout_pred.npy` (shape (1, n/2), like DFR's selection surface) to
`out_dir`, and returns the info the stage cache records.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Subset

from ..storage import load_npy, save_npy
from ..selection import worst_group_acc

log = logging.getLogger(__name__)


def _subset(images, idx: np.ndarray):
    return images[torch.as_tensor(idx)] if torch.is_tensor(images) else Subset(images, idx.tolist())


def heldout_half(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit half, held-out half): DFR's first selection split for this seed."""
    perm = np.random.default_rng([seed, 0]).permutation(n)
    return perm[: n // 2], perm[n // 2 :]


@torch.no_grad()
def weight_change(before: torch.nn.Module, after: torch.nn.Module) -> float:
    """How far a fine-tune moved the network: ||theta_after - theta_before|| / ||theta_before|| over all
    parameters (a tiny or saturated model can move without any test prediction changing)."""
    pa = dict(after.named_parameters())
    diff = sum(float((pa[k].detach().cpu() - p.detach().cpu()).pow(2).sum()) for k, p in before.named_parameters())
    norm = sum(float(p.detach().cpu().pow(2).sum()) for p in before.parameters())
    return (diff / max(norm, 1e-30)) ** 0.5


def run_end_to_end(
    spec,
    model: torch.nn.Module,
    val_images,
    y_val: np.ndarray,
    groups: np.ndarray,
    test_images,
    seed: int,
    out_dir: Path,
    device: str | None = None,
) -> dict:
    from .base import RETRAINERS

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    retrainer = RETRAINERS.get(spec.retrain.method)
    finetune, config = retrainer.finetune, retrainer.config(spec)
    a, b = heldout_half(len(y_val), seed)
    log.info(
        "end-to-end %s: fine-tuning on half of val (%d images) to score the other half", spec.retrain.method, len(a)
    )
    half = finetune(model, _subset(val_images, a), y_val[a], groups[a], config, seed, device=device)
    heldout_pred = half.predict(_subset(val_images, b), device=device)
    log.info("end-to-end %s: fine-tuning on all of val (%d images): the final model", spec.retrain.method, len(y_val))
    full = finetune(model, val_images, y_val, groups, config, seed + 1, device=device)
    test_pred = full.predict(test_images, device=device)
    save_npy(out_dir / "test_pred.npy", test_pred)
    save_npy(out_dir / "heldout_idx.npy", b[None])
    save_npy(out_dir / "heldout_pred.npy", heldout_pred[None])
    moved = weight_change(model, full.model)
    log.info("end-to-end %s: the final fine-tune moved the weights by %.2g of their norm", spec.retrain.method, moved)
    return {
        "steps": {"half": half.steps, "full": full.steps},
        "weight_change": moved,
        "last_loss": full.losses[-1] if full.losses else None,
        "q": full.q.tolist() if full.q is not None else None,
        "heldout_worst_pseudo_group_acc": worst_group_acc(heldout_pred, y_val[b], groups[b]),
        "device": device,
    }


class EndToEndModel:
    """The cached stage's outputs as a `retrain.RetrainedModel` (what `pipeline.evaluate_row` reads)."""

    def __init__(
        self, stage_dir: Path, y_val: np.ndarray, groups: np.ndarray, score_groups: dict[str, np.ndarray] | None = None
    ):
        d = stage_dir
        self.test_pred = load_npy(d / "test_pred.npy")
        self.heldout_idx = load_npy(d / "heldout_idx.npy")
        self.heldout_pred = load_npy(d / "heldout_pred.npy")
        b, pred = self.heldout_idx[0], self.heldout_pred[0]
        scorers = {"pseudo": groups, "class": y_val, **(score_groups or {})}
        self.heldout = {name: worst_group_acc(pred, y_val[b], g[b]) for name, g in scorers.items()}
        self.chosen: dict = {}  # nothing is chosen inside the stage

    def predictions(self, split: str) -> np.ndarray:
        """Labels of `split`: the stage predicted the test images with the fine-tuned network (val is
        predicted on its held-out half only: `heldout_idx`, `heldout_pred`)."""
        if split != "test":
            raise ValueError(
                f"the end_to_end stage saved test predictions only, not '{split}' (val: its held-out "
                f"half, heldout_pred)"
            )
        return self.test_pred
