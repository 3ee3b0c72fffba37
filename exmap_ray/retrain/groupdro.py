"""Online GroupDRO (Sagawa et al., ICLR 2020) on the last layer, with any group labels.

    model = fit_groupdro(val_features, y_val, groups, RETRAINERS.get("groupdro").config(spec), seed=0)
    pred = model.predict(test_features)

A softmax linear head is trained on the frozen, standardised penultimate features of val by
minibatch SGD (momentum 0.9, cosine-decayed step size, group-balanced batches). At every step the
per-group mean losses l_g of the groups in the batch raise their weights, q_g <- q_g * exp(eta * l_g),
q is renormalised, and the step descends
sum_g q_g l_g (+ weight decay / 2 * ||W||^2), so the worst group drives training. Its keys are the
section `retrain.groupdro` (`GroupDROKeys`): eta, the number of passes `epochs`, the step size `lr`;
the weight decay is chosen from `weight_decay_grid` by the worst *given*-group accuracy
on held-out val halves (label-free for pseudo groups; see `common.select_on_halves`). Sagawa et
al.'s generalisation adjustment (C / sqrt(n_g)) is not used. `groupdro_step` is the numpy core.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from .base import RETRAINERS
from ..options import non_negative_list, opt, positive
from .common import LastLayerModel, check_inputs, select_on_halves, standardise

log = logging.getLogger(__name__)
MOMENTUM = 0.9


@dataclass
class GroupDROKeys:
    """GroupDRO's section of the spec, `retrain.groupdro` (eta and batch_size serve its end-to-end mode too)."""

    eta: float = opt(
        0.01,
        "step size of the group weights, q_g <- q_g exp(eta l_g) per batch (Sagawa et al.'s "
        "0.01); larger reacts faster to the worst group but lets q swing between groups",
        positive,
        search={"loguniform": [0.001, 0.1]},
    )
    epochs: int = opt(30, "last layer: passes over val (group-balanced minibatch SGD)", positive)
    lr: float = opt(
        0.02, "last layer: initial SGD step size (momentum 0.9, cosine decay) on standardised features", positive
    )
    batch_size: int = opt(128, "last layer: the minibatch (retrain.end_to_end.batch_size is the fine-tune's)", positive)
    weight_decay_grid: list[float] = opt(
        [1e-4, 1e-3, 1e-2, 1e-1, 1.0],
        "last layer: L2 strengths tried, chosen "
        "by held-out worst pseudo-group accuracy "
        "(label-free); GroupDRO needs strong L2 "
        "(Sagawa et al.)",
        non_negative_list,
    )


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def groupdro_step(W, b, X, yi, gi, q, eta: float, weight_decay: float):
    """One online GroupDRO step on a batch: returns (gradient of W, gradient of b, new q, robust loss).

    `yi` are class indices 0..K-1, `gi` group indices 0..G-1, `q` the (G,) group weights.
    """
    p = _softmax(X @ W.T + b)
    nll = -np.log(np.clip(p[np.arange(len(yi)), yi], 1e-12, None))
    counts = np.bincount(gi, minlength=len(q)).astype(float)
    present = counts > 0
    group_loss = np.bincount(gi, weights=nll, minlength=len(q)) / np.maximum(counts, 1)
    q = q * np.exp(eta * np.where(present, group_loss, 0.0))
    q = q / q.sum()
    # d/dlogits of sum_g q_g * mean_{i in g} nll_i: per sample q_g / n_g * (p - onehot)
    w = (q / np.maximum(counts, 1))[gi]
    dz = p.copy()
    dz[np.arange(len(yi)), yi] -= 1.0
    dz *= w[:, None]
    gW = dz.T @ X + weight_decay * W
    return gW, dz.sum(0), q, float((q * group_loss)[present].sum())


def train_groupdro_head(
    X,
    yi,
    gi,
    n_classes: int,
    n_groups: int,
    *,
    eta: float,
    weight_decay: float,
    lr: float,
    epochs: int,
    batch_size: int,
    seed: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(W (K, d), b (K,), final q (G,)) after `epochs` passes of online GroupDRO.

    Batches are drawn group-balanced (with replacement, P(i) proportional to 1 / |group of i|), as
    in Sagawa et al.'s released GroupDRO runs (`--reweight_groups --robust`): every batch then
    estimates every group's loss, even for a 15-member minority, and q does not swing on noise.
    """
    rng = np.random.default_rng(seed)
    W, b = np.zeros((n_classes, X.shape[1])), np.zeros(n_classes)
    vW, vb = np.zeros_like(W), np.zeros_like(b)
    q = np.full(n_groups, 1.0 / n_groups)
    counts = np.bincount(gi, minlength=n_groups).astype(float)
    p_draw = 1.0 / counts[gi]
    p_draw /= p_draw.sum()
    total, t = epochs * -(-len(yi) // batch_size), 0
    for _ in range(epochs):
        order = rng.choice(len(yi), size=len(yi), p=p_draw)
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            gW, gb, q, _ = groupdro_step(W, b, X[idx], yi[idx], gi[idx], q, eta, weight_decay)
            vW, vb = MOMENTUM * vW + gW, MOMENTUM * vb + gb
            step = lr * 0.5 * (1 + np.cos(np.pi * t / total))  # cosine decay: a calm final iterate
            W, b = W - step * vW, b - step * vb
            t += 1
    return W, b, q


@RETRAINERS.register("groupdro", keys=GroupDROKeys, end_to_end=True)
def fit_groupdro(
    feats: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray,
    r,
    seed: int,
    score_groups: dict[str, np.ndarray] | None = None,
) -> LastLayerModel:
    """Last-layer GroupDRO on val with `groups` (any ids); `r`: its keys and retrain.n_select_repeats
    (a `RetrainConfig`).

    `score_groups` are extra groupings scored on the held-out halves for analysis only."""
    check_inputs("GroupDRO", feats, y, groups)
    X, mean, std = standardise(feats)
    classes, yi = np.unique(y, return_inverse=True)
    gids, gi = np.unique(groups, return_inverse=True)

    def train(idx, wd, fit_seed):
        return train_groupdro_head(
            X[idx],
            yi[idx],
            gi[idx],
            len(classes),
            len(gids),
            eta=r.eta,
            weight_decay=wd,
            lr=r.lr,
            epochs=r.epochs,
            batch_size=r.batch_size,
            seed=fit_seed,
        )

    def fit_predict(a, b_idx, wd, fit_seed):
        W, b, _ = train(a, wd, fit_seed)
        return classes[(X[b_idx] @ W.T + b).argmax(1)]

    grid = list(r.weight_decay_grid)
    best, selection, halves, preds = select_on_halves(
        fit_predict, X, y, groups, grid, r.n_select_repeats, seed, score_groups
    )
    W, b, q = train(np.arange(len(y)), best, int(np.random.default_rng([seed, 2]).integers(2**31 - 1)))
    log.info(
        "GroupDRO: weight decay %g (held-out worst-group acc %.3f), %d groups, final q %s",
        best,
        selection[best]["pseudo"],
        len(gids),
        np.round(q, 3).tolist(),
    )
    return LastLayerModel(
        mean,
        std,
        W,
        b,
        classes,
        {"weight_decay": best},
        selection,
        halves,
        preds,
        method="groupdro",
        extra={"q": {int(g): float(v) for g, v in zip(gids, q)}},
    )
