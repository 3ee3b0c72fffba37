"""Deep feature reweighting (Kirichenko et al.) on the val split, with any group labels.

    model = fit_dfr(val_features, y_val, pseudo_groups, RETRAINERS.get("dfr").config(spec), seed=0)
    pred = model.predict(test_features)

Its keys are the section `retrain.dfr` (`DfrKeys`); the halves are `retrain.n_select_repeats`.

1. Standardise the frozen model's penultimate features (fit on val).
2. Choose C from `c_grid`: over `n_select_repeats` random halves of val, fit an
   L1 logistic regression on a group-balanced subsample of one half (see below) and score the
   *worst group* accuracy on the other half, using the given groups (pseudo
   groups for ExMap: no true group is ever seen here).
3. Final model: average the weights of `n_final_fits` fits on group-balanced
   subsamples of all of val, at the chosen C.

Group-balanced subsample: every group is cut down to the smallest group's size (the DFR paper).
With `retrain.dfr.balance: reweight` nothing is cut: every fit uses all its points, each weighted by
1 / its group's size (scaled to mean 1), and the final model is one such fit on all of val.
With `retrain.dfr.whole_group_max: m` > 0, groups of at most m members enter every fit whole and the rest are
cut down to the smallest group above m, as the released ExMap's DFR does with m = 5: it keeps
small pseudo groups (there `clustering.min_group_size: 1`) without starving every other group.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

from ..errors import UserError
from .base import RETRAINERS
from ..options import non_negative, opt, positive, positive_list
from .head import LinearHead
from ..selection import worst_group_acc

log = logging.getLogger(__name__)
MIN_GROUP_SIZE = 2  # a 1-member group makes every balanced fit reuse that one point


@dataclass
class DfrKeys:
    """DFR's section of the spec, `retrain.dfr`."""

    c_grid: list[float] = opt(
        [1.0, 0.7, 0.3, 0.1, 0.07, 0.03, 0.01],
        "inverse L1 strengths tried (DFR paper grid)",
        positive_list,
        search={"choice": [[1.0, 0.7, 0.3, 0.1], [0.07, 0.03, 0.01]]},
    )
    n_final_fits: int = opt(20, "group-balanced fits on all of val whose weights are averaged", positive)
    whole_group_max: int = opt(
        0,
        "groups with at most this many val members enter every group-balanced fit "
        "whole, and the others are cut down to the smallest group above it; 0 = cut "
        "every group down to the smallest (the DFR paper); 5 = the released ExMap's "
        "DFR, which keeps small pseudo groups (use it with clustering.min_group_size: 1)",
        non_negative,
    )
    balance: Literal["subsample", "reweight"] = opt(
        "subsample",
        "subsample = every fit on a group-balanced subsample, every group cut down to the "
        "smallest (the DFR paper); reweight = every fit on all its points, each weighted by 1 / its "
        "group's size, so the groups weigh the same and no point is dropped (for many small "
        "pseudo groups, e.g. clustering.method spectral_split); one final fit, not n_final_fits",
    )


@dataclass
class DFRModel(LinearHead):
    mean: np.ndarray
    std: np.ndarray
    coef: np.ndarray  # (n_classes or 1, d)
    intercept: np.ndarray
    classes: np.ndarray
    C: float
    selection: dict  # C -> {"pseudo": ..., "class": ..., **extra}: mean held-out worst accuracies
    heldout_idx: np.ndarray  # (repeats, n/2) val indices of each held-out half (same for every grouping)
    heldout_pred: np.ndarray  # (repeats, n/2) predictions there of the fit at the chosen C

    @property
    def heldout(self) -> dict:
        """Held-out worst accuracies at the chosen C (the label-free selection metrics, plus any extras)."""
        return self.selection[self.C]

    @property
    def chosen(self) -> dict:
        """The selected hyperparameter, in the shape every retrainer reports it (see retrain/__init__.py)."""
        return {"C": self.C}


def balance_size(sizes, whole_max: int = 0) -> int | None:
    """The size every group above `whole_max` members is cut down to: the smallest of them.
    None when every group has at most `whole_max` members (they all enter whole)."""
    above = [int(n) for n in sizes if n > whole_max]
    return min(above) if above else None


def balanced_subsample(groups: np.ndarray, rng: np.random.Generator, whole_max: int = 0) -> np.ndarray:
    """Indices with every present group subsampled to the smallest group's size.

    Groups of at most `whole_max` members enter whole (in index order, drawing nothing from `rng`); the
    others are subsampled to the smallest group above `whole_max`. whole_max 0 is plain DFR balancing.
    """
    present = np.unique(groups)
    members = [np.flatnonzero(groups == g) for g in present]
    m = balance_size([len(i) for i in members], whole_max)
    return np.concatenate([i if len(i) <= whole_max else rng.choice(i, m, replace=False) for i in members])


def group_weights(groups: np.ndarray) -> np.ndarray:
    """Per-point weights 1 / (the point's group size), scaled to mean 1: every group weighs the same in a fit."""
    _, inv, counts = np.unique(groups, return_inverse=True, return_counts=True)
    w = 1.0 / counts[inv]
    return w * (len(w) / w.sum())


def _fit(X, y, C, seed, sample_weight=None) -> LogisticRegression:
    # liblinear is the reference's L1 solver but is binary-only in current scikit-learn; saga does L1 multiclass
    binary = len(np.unique(y)) <= 2
    clf = LogisticRegression(
        penalty="l1", C=C, solver="liblinear" if binary else "saga", random_state=seed, max_iter=200 if binary else 1000
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", FutureWarning)  # sklearn >= 1.8 deprecates `penalty`; older lack l1_ratio
        warnings.filterwarnings("ignore", message="Inconsistent values: penalty=l1")
        return clf.fit(X, y, sample_weight=sample_weight)


def _check_groups(y: np.ndarray, groups: np.ndarray) -> None:
    classes = np.unique(y)
    if len(classes) < 2:
        raise UserError(f"DFR needs at least two classes in val; it has only y = {classes[0]}")
    mixed = [int(g) for g in np.unique(groups) if len(np.unique(y[groups == g])) > 1]
    if mixed:
        raise UserError(
            f"DFR groups must each hold one class (pseudo groups are (class, cluster) pairs); "
            f"group {mixed[0]} mixes classes"
        )


@RETRAINERS.register("dfr", keys=DfrKeys)
def fit_dfr(
    feats: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray,
    dspec,
    seed: int,
    score_groups: dict[str, np.ndarray] | None = None,
) -> DFRModel:
    """`dspec`: DFR's keys and retrain.n_select_repeats (a `RetrainConfig`). `score_groups` are extra
    groupings scored on the same held-out halves for analysis only (e.g. the true groups); they never
    influence the choice of C."""
    _check_groups(y, groups)
    whole_max = getattr(dspec, "whole_group_max", 0)
    reweight = getattr(dspec, "balance", "subsample") == "reweight"
    if reweight and whole_max:
        raise UserError(
            f"retrain.dfr.whole_group_max ({whole_max}) applies to retrain.dfr.balance: subsample only; "
            f"with balance: reweight every point enters every fit, so set whole_group_max to 0"
        )
    sizes = {int(g): int((groups == g).sum()) for g in np.unique(groups)}
    balanced = {g: n for g, n in sizes.items() if n > whole_max}  # the groups cut down in balanced fits
    small = min(balanced, key=balanced.get) if balanced else None
    if reweight:
        log.info(
            "DFR: every fit on all its points, weighted by 1 / group size (%d groups, smallest %d)",
            len(sizes),
            min(sizes.values()),
        )
    elif small is not None and sizes[small] < MIN_GROUP_SIZE:
        raise UserError(
            f"DFR: group {small} has {sizes[small]} val member(s), but DFR's group-balanced fits "
            f"subsample every group to the smallest and need at least {MIN_GROUP_SIZE} per group "
            f"(group sizes {sizes}). For pseudo groups raise clustering.min_group_size (fragments "
            f"below it merge into their class's nearest group), or set retrain.dfr.whole_group_max (groups "
            f"that small then enter every fit whole); otherwise enlarge the val split"
        )
    if whole_max:
        log.info(
            "DFR: groups of at most %d members enter every balanced fit whole (%s); the others are cut down to %s",
            whole_max,
            {g: n for g, n in sizes.items() if n <= whole_max},
            sizes[small] if small is not None else "nothing (all enter whole)",
        )
    elif not reweight and sizes[small] < 5:
        log.warning(
            "DFR: smallest group %d has %d members (%s); balanced fits will be tiny", small, sizes[small], sizes
        )
    # halves come from their own stream, so runs with the same seed and val split val identically
    # whatever their groups: a sweep can then score every trial on every trial's pseudo groups
    split_rng, rng = np.random.default_rng([seed, 0]), np.random.default_rng([seed, 1])
    mean, std = feats.mean(0), feats.std(0) + 1e-8
    X = (feats - mean) / std
    scorers = {"pseudo": groups, "class": y, **(score_groups or {})}
    scores = {C: {name: [] for name in scorers} for C in dspec.c_grid}
    halves, preds = [], {C: [] for C in dspec.c_grid}
    for _ in range(dspec.n_select_repeats):
        perm = split_rng.permutation(len(y))
        a, b = perm[: len(y) // 2], perm[len(y) // 2 :]
        if len(np.unique(y[a])) < 2:
            continue
        halves.append(b)
        sub = a if reweight else a[balanced_subsample(groups[a], rng, whole_max)]
        w = group_weights(groups[sub]) if reweight else None
        for C in dspec.c_grid:
            clf = _fit(X[sub], y[sub], C, int(rng.integers(2**31 - 1)), w)
            pred = clf.predict(X[b])
            preds[C].append(pred)
            for name, g in scorers.items():
                scores[C][name].append(worst_group_acc(pred, y[b], g[b]))
    selection = {
        C: {name: float(np.mean(v)) if v else float("nan") for name, v in per.items()} for C, per in scores.items()
    }
    best_C = max(dspec.c_grid, key=lambda C: (np.nan_to_num(selection[C]["pseudo"], nan=-1.0), C))
    coefs, intercepts = [], []
    for _ in range(1 if reweight else dspec.n_final_fits):  # a weighted fit on all of val has nothing to average
        sub = np.arange(len(y)) if reweight else balanced_subsample(groups, rng, whole_max)
        clf = _fit(X[sub], y[sub], best_C, int(rng.integers(2**31 - 1)), group_weights(groups) if reweight else None)
        coefs.append(clf.coef_)
        intercepts.append(clf.intercept_)
    log.info(
        "DFR: C=%g (held-out worst-group acc %.3f), %d groups %s",
        best_C,
        selection[best_C]["pseudo"],
        len(sizes),
        sizes,
    )
    return DFRModel(
        mean,
        std,
        np.mean(coefs, 0),
        np.mean(intercepts, 0),
        clf.classes_,
        best_C,
        selection,
        np.array(halves),
        np.array(preds[best_C]),
    )
