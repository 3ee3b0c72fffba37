"""Does refining the groups (the clusters' members re-assigned by a cross-fitted linear probe of the features)
help, alone or as more `groups.pick_among` entries? Offline, on what `pick_scores.py collect
--keep-features` saved.

    python benchmarks/studies/refine_study.py fit runs/pick-scores/full-dev runs/pick-scores/full-dev-refine
    python benchmarks/studies/refine_study.py score runs/pick-scores/full-dev-refine

`fit`: for each collected family-seed and entry, the entry's val pseudo groups are re-assigned by the
`refine_by_probe` below (with the clusters stage's seed and the spec's
clustering.min_group_size), and the family's DFR is
fitted on them as a row is (`exmap_ray.retrain`, the spec's keys and seed). Per family-seed one pickle:
every entry and every "<entry>+refine", with its groups, held-out halves, test WGA and the minority
recovery of its groups (true groups read for the report only). `score`: per family (mean over the
collected seeds), each entry alone and what `groups.pick_among`'s rule (`search.metric:
sweep_pooled_worst_group_acc`, one-SE, fewest groups) picks from several sets of entries.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

# The refinement studied here: the clusters' members, re-assigned by a linear probe of ERM's features. A shortcut's
# minority is a few percent of a class; the clustering often puts a part of it in the majority's cluster
# and some majority points in its own. The shortcut is linear in the features, so a class-balanced
# logistic regression trained on the noisy cluster labels (within the class) points along it, and its
# cross-fitted prediction puts most stray points back (this study).
REFINE_FOLDS = 5  # cross-fitting: each point is assigned by a probe not fitted on it
REFINE_C = 0.1  # the probe's inverse L2 strength, on standardised features
REFINE_ROUNDS = 2  # re-fit on the new assignment this many times at most (stops when nothing moves)
REFINE_FIT_MAX = 20_000  # points per class a probe is fitted on at most (all points are assigned)


def refine_by_probe(
    groups: np.ndarray, X: np.ndarray, y: np.ndarray, seed: int, min_size: int
) -> tuple[np.ndarray, dict]:
    """Within each class holding two or more pseudo groups, a multinomial logistic
    regression (class-balanced over the groups, L2 with C = REFINE_C on standardised features) learns the
    class's groups from ERM's val features `X`; each point then joins the group its cross-fitted probe
    (REFINE_FOLDS folds, stratified by group) ranks first. Repeated up to REFINE_ROUNDS times. A class whose
    smallest group has fewer than 2 members is left alone. Groups left under `min_size`
    (clustering.min_group_size) then merge into their class's nearest group (`merge_small`), and the ids
    are made dense in their old order. Uses the class labels, groups and features only. Returns the groups
    and, per round, how many points moved."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    from exmap_ray.groups.formation import merge_small

    groups = np.asarray(groups, np.int64)
    X = np.asarray(X, np.float32).reshape(len(groups), -1)
    Xs = (X - X.mean(0)) / (X.std(0) + 1e-6)
    rng = np.random.default_rng(seed)
    out, moved = groups.copy(), []
    for _ in range(REFINE_ROUNDS):
        new = out.copy()
        for c in np.unique(y):
            idx = np.flatnonzero(y == c)
            labs, counts = np.unique(out[idx], return_counts=True)
            if len(labs) < 2 or counts.min() < 2:
                continue
            fit = idx if len(idx) <= REFINE_FIT_MAX else np.sort(rng.choice(idx, REFINE_FIT_MAX, replace=False))
            _, fit_counts = np.unique(out[fit], return_counts=True)
            if len(fit_counts) < len(labs) or fit_counts.min() < 2:
                continue
            score = np.zeros((len(idx), len(labs)))
            pos = {int(i): j for j, i in enumerate(idx)}
            folds = StratifiedKFold(min(REFINE_FOLDS, int(fit_counts.min())), shuffle=True, random_state=seed)
            rest = np.setdiff1d(idx, fit)  # points outside the fitted subsample: every fold's probe, averaged
            for tr, te in folds.split(fit, out[fit]):
                probe = LogisticRegression(C=REFINE_C, class_weight="balanced", max_iter=300)
                with warnings.catch_warnings():  # lbfgs short of its tolerance still ranks the groups
                    warnings.simplefilter("ignore", ConvergenceWarning)
                    probe.fit(Xs[fit[tr]], out[fit[tr]])
                score[[pos[int(i)] for i in fit[te]]] = probe.predict_proba(Xs[fit[te]])
                if len(rest):
                    score[[pos[int(i)] for i in rest]] += probe.predict_proba(Xs[rest])
            new[idx] = labs[score.argmax(1)]
        moved.append(int((new != out).sum()))
        if moved[-1] == 0:
            break
        out = new
    out, merges = merge_small(X, y, out, min_size)
    _, dense = np.unique(out, return_inverse=True)
    return dense.ravel().astype(np.int64), {"moved": moved, "merged": merges}


BASES = ["shipped", "both", "both-merge", "both-silhouette"]
SETS = {  # rows of `score`: label -> the pick_among entries, in order (the first is the spec as it is)
    "the shipped pick (4 entries)": BASES,
    "4 + both-silhouette+refine": [*BASES, "both-silhouette+refine"],
    "4 + both+refine, both-silhouette+refine": [*BASES, "both+refine", "both-silhouette+refine"],
    "every entry with refine instead": [b + "+refine" for b in BASES],
    "4 + the 4 with refine (8 entries)": [*BASES, *(b + "+refine" for b in BASES)],
}


def worst_recovery(true: np.ndarray, groups: np.ndarray) -> float:
    """The smallest, over true groups, best Jaccard overlap with a pseudo group (for the report only)."""
    rec = []
    for t in np.unique(true):
        m = true == t
        rec.append(max(((groups[m] == q).sum() / ((groups == q) | m).sum()) for q in np.unique(groups[m])))
    return float(min(rec))


def fit(src: Path, out: Path) -> None:
    from split_study import fit_entries  # the same loop as split_study's; this folder is on sys.path

    def refine(groups, z, spec, seed):
        from exmap_ray.spec import stage_seed

        new, info = refine_by_probe(
            groups, z["val_features"], z["y"], stage_seed(seed, "clusters"), spec.clustering.min_group_size
        )
        return new, {"moved": info["moved"]}

    fit_entries(src, out, "+refine", refine, lambda z, groups: {"recovery": worst_recovery(z["group"], groups)})


def score(src: Path) -> None:
    from split_study import score as score_sets  # the same pickle layout; this folder is on sys.path

    score_sets(src, SETS)


def main(argv=None) -> int:
    from split_study import fit_score_cli

    return fit_score_cli(__doc__, fit, score, argv)


if __name__ == "__main__":
    sys.exit(main())
