"""Deep feature reweighting (Kirichenko et al.) on the val split, with any group labels.

    model = fit_dfr(val_features, y_val, pseudo_groups, spec.dfr, seed=0)
    pred = model.predict(test_features)

1. Standardise the frozen model's penultimate features (fit on val).
2. Choose C from the grid: over `n_select_repeats` random halves of val, fit an
   L1 logistic regression on a group-balanced subsample of one half and score the
   *worst group* accuracy on the other half, using the given groups (pseudo
   groups for ExMap: no true group is ever seen here).
3. Final model: average the weights of `n_final_fits` fits on group-balanced
   subsamples of all of val, at the chosen C.
"""
from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

from ..errors import UserError

log = logging.getLogger(__name__)
MIN_GROUP_SIZE = 2  # a 1-member group makes every balanced fit reuse that one point


class LinearHead:
    """A linear classifier on standardised features: `mean`, `std`, `coef`, `intercept`, `classes`."""

    mean: np.ndarray
    std: np.ndarray
    coef: np.ndarray
    intercept: np.ndarray
    classes: np.ndarray

    def decision(self, feats: np.ndarray) -> np.ndarray:
        return ((feats - self.mean) / self.std) @ self.coef.T + self.intercept

    def predict(self, feats: np.ndarray) -> np.ndarray:
        d = self.decision(feats)
        idx = (d[:, 0] > 0).astype(int) if d.shape[1] == 1 else d.argmax(1)
        return self.classes[idx]


@dataclass
class DFRModel(LinearHead):
    mean: np.ndarray
    std: np.ndarray
    coef: np.ndarray         # (n_classes or 1, d)
    intercept: np.ndarray
    classes: np.ndarray
    C: float
    selection: dict          # C -> {"pseudo": ..., "class": ..., **extra}: mean held-out worst accuracies
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


def balanced_subsample(groups: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Indices with every present group subsampled to the smallest group's size."""
    present = np.unique(groups)
    m = min(int((groups == g).sum()) for g in present)
    return np.concatenate([rng.choice(np.flatnonzero(groups == g), m, replace=False) for g in present])


def _fit(X, y, C, seed) -> LogisticRegression:
    # liblinear is the reference's L1 solver but is binary-only in current scikit-learn; saga does L1 multiclass
    binary = len(np.unique(y)) <= 2
    clf = LogisticRegression(penalty="l1", C=C, solver="liblinear" if binary else "saga", random_state=seed,
                             max_iter=200 if binary else 1000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", FutureWarning)  # sklearn >= 1.8 deprecates `penalty`; older lack l1_ratio
        warnings.filterwarnings("ignore", message="Inconsistent values: penalty=l1")
        return clf.fit(X, y)


def worst_group_acc(pred, y, groups) -> float:
    return min(float((pred[groups == g] == y[groups == g]).mean()) for g in np.unique(groups))


def _check_groups(y: np.ndarray, groups: np.ndarray) -> None:
    classes = np.unique(y)
    if len(classes) < 2:
        raise UserError(f"DFR needs at least two classes in val; it has only y = {classes[0]}")
    mixed = [int(g) for g in np.unique(groups) if len(np.unique(y[groups == g])) > 1]
    if mixed:
        raise UserError(f"DFR groups must each hold one class (pseudo groups are (class, cluster) pairs); "
                        f"group {mixed[0]} mixes classes")


def fit_dfr(feats: np.ndarray, y: np.ndarray, groups: np.ndarray, dspec, seed: int,
            score_groups: dict[str, np.ndarray] | None = None) -> DFRModel:
    """`score_groups` are extra groupings scored on the same held-out halves for analysis only
    (e.g. the true groups); they never influence the choice of C."""
    _check_groups(y, groups)
    sizes = {int(g): int((groups == g).sum()) for g in np.unique(groups)}
    small = min(sizes, key=sizes.get)
    if sizes[small] < MIN_GROUP_SIZE:
        raise UserError(f"DFR: group {small} has {sizes[small]} val member(s), but DFR's group-balanced fits "
                        f"subsample every group to the smallest and need at least {MIN_GROUP_SIZE} per group "
                        f"(group sizes {sizes}). For pseudo groups raise clustering.min_group_size (fragments "
                        f"below it merge into their class's nearest group); otherwise enlarge the val split")
    if sizes[small] < 5:
        log.warning("DFR: smallest group %d has %d members (%s); balanced fits will be tiny",
                    small, sizes[small], sizes)
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
        a, b = perm[: len(y) // 2], perm[len(y) // 2:]
        if len(np.unique(y[a])) < 2:
            continue
        halves.append(b)
        sub = a[balanced_subsample(groups[a], rng)]
        for C in dspec.c_grid:
            clf = _fit(X[sub], y[sub], C, int(rng.integers(2**31 - 1)))
            pred = clf.predict(X[b])
            preds[C].append(pred)
            for name, g in scorers.items():
                scores[C][name].append(worst_group_acc(pred, y[b], g[b]))
    selection = {C: {name: float(np.mean(v)) if v else float("nan") for name, v in per.items()}
                 for C, per in scores.items()}
    best_C = max(dspec.c_grid, key=lambda C: (np.nan_to_num(selection[C]["pseudo"], nan=-1.0), C))
    coefs, intercepts = [], []
    for _ in range(dspec.n_final_fits):
        sub = balanced_subsample(groups, rng)
        clf = _fit(X[sub], y[sub], best_C, int(rng.integers(2**31 - 1)))
        coefs.append(clf.coef_)
        intercepts.append(clf.intercept_)
    log.info("DFR: C=%g (held-out worst-group acc %.3f), %d groups %s", best_C, selection[best_C]["pseudo"],
             len(sizes), sizes)
    return DFRModel(mean, std, np.mean(coefs, 0), np.mean(intercepts, 0), clf.classes_, best_C, selection,
                    np.array(halves), np.array(preds[best_C]))


def worst_over_groupings(heldout_idx: np.ndarray, heldout_pred: np.ndarray, y: np.ndarray,
                         groupings: list[np.ndarray], min_members: int = 3) -> float:
    """Label-free score of one model against many pseudo-groupings of val (e.g. every trial's in a sweep).

    For each grouping, the worst group accuracy on each held-out half (groups with fewer than
    `min_members` there are skipped as noise), averaged over halves; then the minimum over
    groupings. A model that ignores a minority that *any* grouping isolated scores low, which a
    trial's own groups cannot show when its clustering missed that minority.
    """
    return worst_over_groupings_halves(heldout_idx, heldout_pred, y, groupings, min_members)[0]


class GroupingSet(NamedTuple):
    """Distinct groupings of one val split, numbered for `np.bincount` (see `prepare_groupings`)."""
    codes: np.ndarray    # (U, N) int64: grouping u's groups as offsets[u] .. offsets[u+1]-1, in sorted label order
    offsets: np.ndarray  # (U + 1,) where each grouping's codes start
    sizes: np.ndarray    # (offsets[-1],) val size of every code
    first: np.ndarray    # (U,) position in the caller's list of each distinct grouping's first occurrence


GROUPING_BLOCK = 1 << 22  # codes scored per bincount: bounds the temporary index array to 32 MB


def prepare_groupings(groupings: list[np.ndarray]) -> GroupingSet:
    """Number every distinct grouping once (identical ones, e.g. trials that share a clustering, count once).

    A sweep scores each of its T trials on the same list of groupings: preparing them once and
    scoring with bincounts makes the summary O(T * U * N) with U <= T distinct groupings, instead
    of comparing boolean masks group by group, O(T^2 * N * G).
    """
    seen: dict[bytes, int] = {}
    codes, first, sizes, offsets = [], [], [], [0]
    for i, g in enumerate(groupings):
        g = np.asarray(g)
        key = g.dtype.str.encode() + g.tobytes()
        if key in seen:
            continue
        seen[key] = i
        _, inv = np.unique(g, return_inverse=True)  # sorted labels, so the smallest code is the smallest label
        n_groups = int(inv.max()) + 1 if inv.size else 0
        codes.append(inv.ravel().astype(np.int64) + offsets[-1])
        sizes.append(np.bincount(inv.ravel(), minlength=n_groups))
        offsets.append(offsets[-1] + n_groups)
        first.append(i)
    n = len(groupings[0]) if len(groupings) else 0
    return GroupingSet(np.array(codes, np.int64).reshape(len(codes), n), np.array(offsets, np.int64),
                       np.concatenate(sizes) if sizes else np.zeros(0, np.int64), np.array(first, np.int64))


def _half_worst(codes: np.ndarray, offsets: np.ndarray, idx: np.ndarray, correct: np.ndarray,
                min_members: int) -> tuple[np.ndarray, np.ndarray]:
    """Per grouping, the worst accuracy on one held-out half over groups with >= min_members there
    (inf where none qualifies) and the code of that group (ties: the smallest code)."""
    u = len(codes)
    worst, arg = np.full(u, np.inf), np.full(u, -1, np.int64)
    step = max(1, GROUPING_BLOCK // max(len(idx), 1))
    for lo in range(0, u, step):
        hi = min(u, lo + step)
        c = codes[lo:hi, idx].ravel()
        base, top = int(offsets[lo]), int(offsets[hi])
        count = np.bincount(c - base, minlength=top - base)
        right = np.bincount(c - base, weights=np.tile(correct, hi - lo), minlength=top - base)
        with np.errstate(invalid="ignore", divide="ignore"):
            acc = np.where(count >= max(min_members, 1), right / count, np.inf)
        for j in range(lo, hi):
            seg = acc[offsets[j] - base:offsets[j + 1] - base]
            if len(seg):
                a = int(np.argmin(seg))  # first minimum: the smallest code among equal accuracies
                worst[j], arg[j] = seg[a], offsets[j] + a
    return worst, arg


def worst_over_groupings_halves(heldout_idx: np.ndarray, heldout_pred: np.ndarray, y: np.ndarray,
                                groupings: list[np.ndarray] | GroupingSet, min_members: int = 3
                                ) -> tuple[float, np.ndarray, np.ndarray]:
    """`worst_over_groupings`, the per-half worst accuracies of the grouping that set it, and the val
    size of the group that was worst on each of those halves.

    Those give the score's noise for the one-standard-error selection rule (`search.select: one_se`):
    the spread over halves (`search.se: halves`), or a binomial error on the worst group's size
    (`search.se: binomial`). `groupings` may be a list or, when many models are scored on the same
    list (a sweep summary), the `prepare_groupings` of it, built once.
    """
    gs = groupings if isinstance(groupings, GroupingSet) else prepare_groupings(groupings)
    y = np.asarray(y)
    halves = [_half_worst(gs.codes, gs.offsets, np.asarray(idx), np.asarray(pred) == y[idx], min_members)
              for idx, pred in zip(heldout_idx, heldout_pred)]
    if not halves:
        return float("nan"), np.array([]), np.array([])
    worst = np.stack([w for w, _ in halves])  # (halves, U)
    arg = np.stack([a for _, a in halves])
    best_mean, best_u = float("nan"), -1
    for u in range(len(gs.codes)):  # the minimum over groupings, the first one on ties (as listed)
        ok = np.isfinite(worst[:, u])
        if ok.any():
            mean = float(np.mean(worst[ok, u].tolist()))
            if not (mean >= best_mean):
                best_mean, best_u = mean, u
    if best_u < 0:
        return float("nan"), np.array([]), np.array([])
    ok = np.isfinite(worst[:, best_u])
    return best_mean, worst[ok, best_u], gs.sizes[arg[ok, best_u]].astype(int)


def score_se(score: float, halves: np.ndarray, sizes: np.ndarray, kind: str) -> float:
    """Standard error of a held-out worst-group score (nan when it cannot be estimated).

    halves: the spread over held-out halves. They overlap, so it understates the noise when the
    worst group is a handful of images. binomial: sqrt(p(1-p)/n) with p the score and n the val size
    of the worst group (mean over halves); the halves together cover about all of val, so n is the
    sample the score rests on.
    """
    if kind == "halves":
        return float(np.std(halves, ddof=1) / np.sqrt(len(halves))) if len(halves) > 1 else float("nan")
    if kind == "binomial":
        if not len(sizes) or math.isnan(score):
            return float("nan")
        return math.sqrt(max(score * (1 - score), 0.0) / float(np.mean(sizes)))
    raise ValueError(f"unknown standard-error kind {kind!r}; use 'binomial' or 'halves'")
