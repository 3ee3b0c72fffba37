"""Label-free selection maths: worst-group accuracy on held-out halves of val, over one or many groupings.

    from exmap_ray.selection import worst_over_groupings_halves, score_se
    score, halves, sizes = worst_over_groupings_halves(heldout_idx, heldout_pred, y, [pseudo_groups])
    se = score_se(score, halves, sizes, "binomial")

The retrainers choose their hyperparameters with `worst_group_acc` on the *given* (pseudo) groups
(retrain/dfr.py, retrain/common.py); a sweep chooses among trials by scoring each trial's held-out
predictions on every trial's pseudo groups (`worst_over_groupings`, tune.py). Both sides import
these from here. Arrays in, floats out; no true group is needed.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np


def worst_group_acc(pred, y, groups) -> float:
    return min(float((pred[groups == g] == y[groups == g]).mean()) for g in np.unique(groups))


def worst_over_groupings(
    heldout_idx: np.ndarray, heldout_pred: np.ndarray, y: np.ndarray, groupings: list[np.ndarray], min_members: int = 3
) -> float:
    """Label-free score of one model against many pseudo-groupings of val (e.g. every trial's in a sweep).

    For each grouping, the worst group accuracy on each held-out half (groups with fewer than
    `min_members` there are skipped as noise), averaged over halves; then the minimum over
    groupings. A model that ignores a minority that *any* grouping isolated scores low, which a
    trial's own groups cannot show when its clustering missed that minority.
    """
    return worst_over_groupings_halves(heldout_idx, heldout_pred, y, groupings, min_members)[0]


class GroupingSet(NamedTuple):
    """Distinct groupings of one val split, numbered for `np.bincount` (see `prepare_groupings`)."""

    codes: np.ndarray  # (U, N) int64: grouping u's groups as offsets[u] .. offsets[u+1]-1, in sorted label order
    offsets: np.ndarray  # (U + 1,) where each grouping's codes start
    sizes: np.ndarray  # (offsets[-1],) val size of every code
    first: np.ndarray  # (U,) position in the caller's list of each distinct grouping's first occurrence


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
    return GroupingSet(
        np.array(codes, np.int64).reshape(len(codes), n),
        np.array(offsets, np.int64),
        np.concatenate(sizes) if sizes else np.zeros(0, np.int64),
        np.array(first, np.int64),
    )


def _half_worst(
    codes: np.ndarray,
    offsets: np.ndarray,
    idx: np.ndarray,
    correct: np.ndarray,
    min_members: int,
    sizes: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per grouping, the worst accuracy on one held-out half over groups with >= min_members there
    (inf where none qualifies) and the code of that group (ties: the smallest code). With `sizes` (every
    code's val size), a group qualifies by its val size instead, where it has any member in `idx`."""
    u = len(codes)
    worst, arg = np.full(u, np.inf), np.full(u, -1, np.int64)
    step = max(1, GROUPING_BLOCK // max(len(idx), 1))
    for lo in range(0, u, step):
        hi = min(u, lo + step)
        c = codes[lo:hi, idx].ravel()
        base, top = int(offsets[lo]), int(offsets[hi])
        count = np.bincount(c - base, minlength=top - base)
        right = np.bincount(c - base, weights=np.tile(correct, hi - lo), minlength=top - base)
        keep = count >= max(min_members, 1) if sizes is None else (count > 0) & (sizes[base:top] >= max(min_members, 1))
        with np.errstate(invalid="ignore", divide="ignore"):
            acc = np.where(keep, right / count, np.inf)
        for j in range(lo, hi):
            seg = acc[offsets[j] - base : offsets[j + 1] - base]
            if len(seg):
                a = int(np.argmin(seg))  # first minimum: the smallest code among equal accuracies
                worst[j], arg[j] = seg[a], offsets[j] + a
    return worst, arg


def worst_over_groupings_halves(
    heldout_idx: np.ndarray,
    heldout_pred: np.ndarray,
    y: np.ndarray,
    groupings: list[np.ndarray] | GroupingSet,
    min_members: int = 3,
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
    halves = [
        _half_worst(gs.codes, gs.offsets, np.asarray(idx), np.asarray(pred) == y[idx], min_members)
        for idx, pred in zip(heldout_idx, heldout_pred)
    ]
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


def pooled_worst_over_groupings(
    heldout_idx: np.ndarray,
    heldout_pred: np.ndarray,
    y: np.ndarray,
    groupings: list[np.ndarray] | GroupingSet,
    min_members: int = 3,
) -> tuple[float, np.ndarray, np.ndarray]:
    """The worst accuracy over every group of every grouping, each group's accuracy pooled over the held-out
    halves (all the predictions made for its members); groups with fewer than `min_members` val members
    are left out. Returns it, that group's accuracy on each half (where it has members) and its val size
    (as `worst_over_groupings_halves`, for `score_se`).

    Unlike the per-half worst averaged over halves, a group's accuracy is measured on every held-out
    prediction of its members before the minimum is taken, so the score is not pulled down by whichever
    few-member group happens to be worst on each half (with many small groups, that minimum of noisy
    values sits below every group's true accuracy, and most for the model fitted to the most groups).
    """
    gs = groupings if isinstance(groupings, GroupingSet) else prepare_groupings(groupings)
    y = np.asarray(y)
    if not len(gs.codes) or not len(heldout_idx):
        return float("nan"), np.array([]), np.array([])
    idx = np.concatenate([np.asarray(i) for i in heldout_idx])  # every half's predictions as one
    right = np.concatenate([np.asarray(p) == y[np.asarray(i)] for i, p in zip(heldout_idx, heldout_pred)])
    worst, arg = _half_worst(gs.codes, gs.offsets, idx, right, min_members, sizes=gs.sizes)
    u = int(np.argmin(worst))  # the first on ties: the earliest grouping (its smallest code)
    if not np.isfinite(worst[u]):
        return float("nan"), np.array([]), np.array([])
    w = int(arg[u])
    halves = []
    for i, p in zip(heldout_idx, heldout_pred):
        m = gs.codes[u, np.asarray(i)] == w
        if m.any():
            halves.append(float((np.asarray(p)[m] == y[np.asarray(i)][m]).mean()))
    return float(worst[u]), np.array(halves), np.full(len(halves), int(gs.sizes[w]))


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


# ── the label-free choice among trials (a sweep's summary, bench --zoo, groups.pick_among) ─────────────
SWEEP_METRIC = "sweep_worst_pseudo_group_acc"  # needs every trial: scored on every trial's pseudo groups
POOLED_METRIC = "sweep_pooled_worst_group_acc"  # the same groups, each group's accuracy pooled over the halves
SWEEP_METRICS = (SWEEP_METRIC, POOLED_METRIC)  # the metrics a trial cannot compute alone


def _best(rows: list[dict], key: str) -> dict | None:
    ok = [r for r in rows if r["status"] == "OK" and r.get(key) is not None and not math.isnan(r[key])]
    return max(ok, key=lambda r: r[key]) if ok else None


def choose(rows: list[dict], select: str) -> dict | None:
    """The label-free choice: the best selection metric, or (one_se) the simplest trial within its noise.

    one_se is the one-standard-error rule: with `se` the standard error of the best trial's score
    (`search.se`), every trial scoring at least best - se is as good as the data can tell, and among
    those the one with the fewest pseudo groups (larger groups: steadier balanced DFR fits) is chosen,
    ties to the higher score. No true group enters.
    """
    best = _best(rows, "selection_metric")
    se = best.get("selection_se") if best else None
    if best is None or select == "best" or se is None or math.isnan(se):
        return best
    band = [
        r
        for r in rows
        if r["status"] == "OK"
        and r.get("selection_metric") is not None
        and r["selection_metric"] >= best["selection_metric"] - se
    ]
    return min(band, key=lambda r: (r.get("n_groups") or math.inf, -r["selection_metric"], r["trial"]))


def score_trials(ok: list[dict], loaded: dict, metric: str, se: str = "binomial", min_members: int = 3) -> None:
    """`add_sweep_metric` on trials whose held-out predictions are in memory: `loaded[trial]` holds
    heldout_idx, heldout_pred, pseudo_groups and y (what a trial's selection.npz holds). `exmap-ray bench
    --zoo` scores its in-process sweep with this, so its pick is the one `exmap-ray tune` would make."""
    import hashlib

    buckets: dict[str, list[dict]] = {}
    for r in ok:  # trials that vary dataset or seed have another val: compare within a bucket
        d = loaded[r["trial"]]  # (each trial is scored on its own held-out halves: end-to-end trials have one)
        buckets.setdefault(hashlib.sha1(np.asarray(d["y"], np.int64).tobytes()).hexdigest(), []).append(r)
    for group in buckets.values():  # the bucket's groupings are numbered once, then every trial is scored on them
        groupings = prepare_groupings([loaded[r["trial"]]["pseudo_groups"] for r in group])
        for r in group:
            d = loaded[r["trial"]]
            r[SWEEP_METRIC], halves, sizes = worst_over_groupings_halves(
                d["heldout_idx"], d["heldout_pred"], d["y"], groupings, min_members
            )
            pooled = pooled_worst_over_groupings(d["heldout_idx"], d["heldout_pred"], d["y"], groupings, min_members)
            r[POOLED_METRIC] = pooled[0]
            if metric == SWEEP_METRIC:
                r["selection_metric"] = r[SWEEP_METRIC]
            elif metric == POOLED_METRIC:
                r["selection_metric"], halves, sizes = pooled
            else:  # the noise of the trial's own metric: its own pseudo groups, or the classes
                own = d["y"] if metric == "val_worst_class_acc" else d["pseudo_groups"]
                _, halves, sizes = worst_over_groupings_halves(
                    d["heldout_idx"], d["heldout_pred"], d["y"], [own], min_members
                )
            r["selection_se"] = score_se(r["selection_metric"], halves, sizes, se)


def pick_among(candidates: list, y, metric: str, select: str, se: str, min_members: int = 3) -> tuple[int, list[dict]]:
    """The candidate `exmap-ray tune` would choose among models fitted on the same val (each a (Row, its
    val pseudo groups); a Row's `model` holds its held-out halves' predictions): its index, and every
    candidate's scores (selection_metric, selection_se, n_groups)."""
    scored, loaded = [], {}
    for i, (r, pseudo) in enumerate(candidates):
        m = r.model
        loaded[i] = {"heldout_idx": m.heldout_idx, "heldout_pred": m.heldout_pred, "pseudo_groups": pseudo, "y": y}
        scored.append(
            {
                "trial": i,
                "status": "OK",
                "n_groups": int(r.group_info["n_groups"]),
                "val_worst_pseudo_group_acc": m.heldout["pseudo"],
                "val_worst_class_acc": m.heldout["class"],
            }
        )
    if metric not in SWEEP_METRICS:  # the trial's own metric, as tune reports it
        for r in scored:
            r["selection_metric"] = r[metric]
    score_trials(scored, loaded, metric, se, min_members)
    return choose(scored, select)["trial"], scored
