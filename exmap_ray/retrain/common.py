"""What the last-layer retrainers share: the fitted head, and label-free choice of one hyperparameter.

A `LastLayerModel` is a linear head on standardised penultimate features, with the same surface as
`DFRModel` (`predict`, `decision`, `selection`, `heldout`, `heldout_idx`, `heldout_pred`, `chosen`),
so callers can swap retrainers. `select_on_halves` picks a hyperparameter the way `dfr.py` picks C:
over random halves of val, fit on one half and score the worst *given*-group accuracy on the other
(pseudo groups for ExMap: no true group is seen). The halves come from the same random stream as
DFR's (`default_rng([seed, 0])`), so with one seed every retrainer is scored on the same halves and
sweep-level scores such as `selection.worst_over_groupings` compare them fairly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..errors import UserError
from ..selection import worst_group_acc
from .head import LinearHead


@dataclass
class LastLayerModel(LinearHead):
    mean: np.ndarray
    std: np.ndarray
    coef: np.ndarray  # (n_classes or 1, d), on standardised features
    intercept: np.ndarray
    classes: np.ndarray
    chosen: dict  # the selected hyperparameter(s), e.g. {"weight_decay": 0.01}
    selection: dict  # candidate value -> {"pseudo": ..., "class": ..., **extra}: mean held-out worst accs
    heldout_idx: np.ndarray  # (repeats, n/2) val indices of each held-out half
    heldout_pred: np.ndarray  # (repeats, n/2) predictions there at the chosen value
    method: str = ""
    extra: dict = field(default_factory=dict)  # method-specific diagnostics (final GroupDRO q, error-set size, ...)

    @property
    def heldout(self) -> dict:
        """Held-out worst accuracies at the chosen value (the label-free selection metrics, plus any extras)."""
        return self.selection[next(iter(self.chosen.values()))]


def standardise(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(X, mean, std): features standardised with val statistics, as DFR does."""
    feats = np.asarray(feats, np.float64)
    mean, std = feats.mean(0), feats.std(0) + 1e-8
    return (feats - mean) / std, mean, std


def check_inputs(name: str, feats: np.ndarray, y: np.ndarray, groups: np.ndarray) -> None:
    if not (len(feats) == len(y) == len(groups)):
        raise UserError(f"{name}: features, labels and groups differ in length ({len(feats)}, {len(y)}, {len(groups)})")
    classes = np.unique(y)
    if len(classes) < 2:
        raise UserError(f"{name} needs at least two classes in val; it has only y = {classes[0]}")


def select_on_halves(
    fit_predict: Callable[[np.ndarray, np.ndarray, object, int], np.ndarray],
    X: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray,
    grid: list,
    repeats: int,
    seed: int,
    score_groups: dict[str, np.ndarray] | None = None,
):
    """Choose a value from `grid` by mean held-out worst-group accuracy under `groups`.

    `fit_predict(train_idx, test_idx, value, fit_seed) -> predictions on test_idx`. Also scored, for
    analysis only: worst-class accuracy ("class") and any `score_groups` (e.g. "true"). Ties go to the
    earlier value in `grid`. Returns (best value, selection dict, held-out indices, their predictions).
    """
    split_rng, rng = np.random.default_rng([seed, 0]), np.random.default_rng([seed, 1])
    scorers = {"pseudo": groups, "class": y, **(score_groups or {})}
    scores = {v: {name: [] for name in scorers} for v in grid}
    halves, preds = [], {v: [] for v in grid}
    for _ in range(repeats):
        perm = split_rng.permutation(len(y))
        a, b = perm[: len(y) // 2], perm[len(y) // 2 :]
        if len(np.unique(y[a])) < 2:
            continue
        halves.append(b)
        for v in grid:
            pred = fit_predict(a, b, v, int(rng.integers(2**31 - 1)))
            preds[v].append(pred)
            for name, g in scorers.items():
                scores[v][name].append(worst_group_acc(pred, y[b], g[b]))
    selection = {
        v: {name: float(np.mean(s)) if s else float("nan") for name, s in per.items()} for v, per in scores.items()
    }
    best = max(grid, key=lambda v: (np.nan_to_num(selection[v]["pseudo"], nan=-1.0), -grid.index(v)))
    return best, selection, np.array(halves), np.array(preds[best])


def error_set_from_groups(y: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Boolean mask: points outside the largest (class, group) cell of their class (ties: the lower group id)."""
    y, groups = np.asarray(y), np.asarray(groups)
    err = np.zeros(len(y), bool)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        ids, counts = np.unique(groups[idx], return_counts=True)
        err[idx] = groups[idx] != ids[np.argmax(counts)]
    return err
