"""Just Train Twice (Liu et al., ICML 2021) on the last layer: upweight an error set and retrain.

    model = fit_jtt(val_features, y_val, groups, RETRAINERS.get("jtt").config(spec), seed=0)
    pred = model.predict(test_features)

JTT's second stage retrains with the first model's mistakes upsampled `retrain.jtt.upweight`
(lambda_up) times. Here the error set is read off the group labels given: within each class the
largest (class, group) cell is the majority and every point outside it is in the error set. With the
`jtt_error_set` group source (group = 2 y + [ERM wrong]) that is exactly ERM's val errors, as in the
paper; with pseudo or true groups it is the class's minority groups. Upsampling by lambda_up is done
exactly, as sample weights in an L2 logistic regression on standardised val features (sklearn,
lbfgs); its weight decay is chosen from `retrain.jtt.weight_decay_grid` by the worst given-group
accuracy on held-out val halves (label-free, `common.select_on_halves`).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

from .base import RETRAINERS
from ..options import non_negative_list, opt
from .common import LastLayerModel, check_inputs, error_set_from_groups, select_on_halves, standardise

log = logging.getLogger(__name__)


@dataclass
class JttKeys:
    """JTT's section of the spec, `retrain.jtt` (upweight serves its end-to-end mode too)."""

    upweight: float = opt(
        20.0,
        "lambda_up: weight of the error set (a class's points outside its largest group); the JTT paper uses 20 to 100",
        lambda v: None if v >= 1 else "a number >= 1",
        search={"choice": [20.0, 50.0, 100.0]},
    )
    weight_decay_grid: list[float] = opt(
        [1e-4, 1e-3, 1e-2, 1e-1, 1.0],
        "last layer: L2 strengths tried for the "
        "upweighted head, chosen by held-out "
        "worst pseudo-group accuracy (label-free)",
        non_negative_list,
    )


def fit_weighted_logreg(X, y, weights, weight_decay: float, seed: int) -> LogisticRegression:
    """min  sum_i w_i loss_i / sum_i w_i + weight_decay / 2 * ||coef||^2  (sklearn's C = 1 / (wd * sum w))."""
    C = 1.0 / (max(weight_decay, 1e-12) * float(np.sum(weights)))
    clf = LogisticRegression(C=C, max_iter=1000, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return clf.fit(X, y, sample_weight=weights)


@RETRAINERS.register("jtt", keys=JttKeys, end_to_end=True)
def fit_jtt(
    feats: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray,
    r,
    seed: int,
    score_groups: dict[str, np.ndarray] | None = None,
) -> LastLayerModel:
    """Last-layer JTT on val; `r`: its keys and retrain.n_select_repeats (a `RetrainConfig`).
    `score_groups`: analysis only."""
    check_inputs("JTT", feats, y, groups)
    X, mean, std = standardise(feats)
    err = error_set_from_groups(y, groups)
    if not err.any():
        log.warning("JTT: the groups give an empty error set (one group per class); this is plain ERM")
    weights = np.where(err, r.upweight, 1.0)

    def fit_predict(a, b, wd, fit_seed):
        return fit_weighted_logreg(X[a], y[a], weights[a], wd, fit_seed).predict(X[b])

    grid = list(r.weight_decay_grid)
    best, selection, halves, preds = select_on_halves(
        fit_predict, X, y, groups, grid, r.n_select_repeats, seed, score_groups
    )
    clf = fit_weighted_logreg(X, y, weights, best, seed)
    log.info(
        "JTT: weight decay %g (held-out worst-group acc %.3f), error set %d of %d, upweight %g",
        best,
        selection[best]["pseudo"],
        int(err.sum()),
        len(y),
        r.upweight,
    )
    return LastLayerModel(
        mean,
        std,
        clf.coef_,
        clf.intercept_,
        clf.classes_,
        {"weight_decay": best},
        selection,
        halves,
        preds,
        method="jtt",
        extra={"error_set_size": int(err.sum()), "upweight": float(r.upweight)},
    )
