"""Group metrics: per-group accuracy, worst-group accuracy, two means, and group recovery.

"Mean accuracy" is ambiguous in this literature, so we report both:
- `mean_acc`: the plain accuracy over all test samples (the test set's own mix);
- `mean_acc_train_weighted`: per-group test accuracy weighted by the *train*
  group proportions (what the DFR/ExMap reference code reports as mean acc).
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score


def group_accuracies(pred: np.ndarray, y: np.ndarray, group: np.ndarray, n_groups: int) -> np.ndarray:
    """Accuracy per true group; NaN where a group has no members."""
    out = np.full(n_groups, np.nan)
    for g in range(n_groups):
        m = group == g
        if m.any():
            out[g] = float((pred[m] == y[m]).mean())
    return out


def evaluate(pred, y, group, group_names: list[str], train_group: np.ndarray) -> dict:
    acc = group_accuracies(pred, y, group, len(group_names))
    w = np.bincount(train_group, minlength=len(group_names)).astype(float)
    present = ~np.isnan(acc)
    w = w * present
    return {
        "worst_group_acc": float(np.nanmin(acc)),
        "mean_acc": float((pred == y).mean()),
        "mean_acc_train_weighted": float((np.nan_to_num(acc) * w).sum() / w.sum()) if w.sum() else float("nan"),
        "per_group": {name: (None if np.isnan(a) else float(a)) for name, a in zip(group_names, acc)},
    }


def recovery(pseudo: np.ndarray, true: np.ndarray) -> dict[int, float]:
    """Per true group: the share of its members that land in pseudo groups where it is the majority.

    ARI is dominated by large groups; this shows whether a small minority was found.
    """
    majority = {}
    for p in np.unique(pseudo):
        vals, counts = np.unique(true[pseudo == p], return_counts=True)
        majority[int(p)] = int(vals[np.argmax(counts)])
    owner = np.array([majority[int(p)] for p in pseudo])
    return {int(g): float((owner[true == g] == g).mean()) for g in np.unique(true)}


def agreement(pseudo: np.ndarray, true: np.ndarray, group_names: list[str]) -> dict:
    rec = recovery(pseudo, true)
    return {
        "ari": float(adjusted_rand_score(true, pseudo)),
        "nmi": float(normalized_mutual_info_score(true, pseudo)),
        "recovery": {group_names[g]: r for g, r in rec.items()},
        "worst_recovery": float(min(rec.values())),
    }


def shortcut_gaps(pred: np.ndarray, y: np.ndarray, aligned: dict[str, np.ndarray]) -> dict:
    """Per-shortcut gaps for any number of shortcuts (cmnist_multi), in the spirit of UrbanCars' report.

    `aligned[name]` is True where shortcut `name` agrees with the label. The in-distribution
    accuracy is taken where every shortcut agrees; each gap is the accuracy where exactly the
    named shortcut disagrees (and, for "all", where all of them do) minus that. Negative gaps
    mean the model leans on the shortcut. NaN where no test image is in a cell. UrbanCars itself
    weights its cells by the train ratios: `data.urbancars.urbancars_gaps`.
    """
    correct = pred == y
    names = list(aligned)
    masks = {n: np.asarray(aligned[n], bool) for n in names}
    all_ok = np.logical_and.reduce([masks[n] for n in names])

    def acc(m):
        return float(correct[m].mean()) if m.any() else float("nan")

    out = {"id_acc": acc(all_ok)}
    for n in names:
        only = ~masks[n] & np.logical_and.reduce([masks[o] for o in names if o != n] or [np.ones_like(all_ok)])
        out[f"{n}_gap"] = acc(only) - out["id_acc"]
    if len(names) > 1:
        none_ok = np.logical_and.reduce([~masks[n] for n in names])
        out["+".join(names) + "_gap"] = acc(none_ok) - out["id_acc"]
    return out
