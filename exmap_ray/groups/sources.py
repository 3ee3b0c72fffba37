"""Group inference for the val split: ExMap and the baselines it is compared against, in `GROUP_SOURCES`.

    from exmap_ray.groups import GroupContext, infer_groups
    ctx = GroupContext(y_val=y, clustering=spec.clustering, seed=0, val_features=F, val_logits=L, heatmaps=H)
    groups, info = infer_groups("exmap", ctx)

Every source maps a `GroupContext` to `(groups, info)`: an int64 array of non-negative group ids,
one per val point, and a JSON-able dict (always with `source`, `n_groups` and `sizes`). Sources:
`exmap` (cluster the heatmaps, the paper; `clustering.input: features` clusters features instead,
`both` the two side by side),
`features` (GEORGE-style: the same clusterer on penultimate features, each class apart),
`jtt_error_set` (group = 2 y + [ERM is wrong], JTT's error set), `random` (random groups per class:
a sanity floor), `class` (group = class: no inference, for DPE's label-free row) and `true` (the
oracle); with the `peers` extra, SpuCo's GEORGE, SPARE and EIIL (`spuco_george`, `spuco_spare`,
`spuco_eiil`: groups/peers.py, registered by plugins.py). The true val groups reach the oracle only:
`infer_groups` hands every other source a context with `true_groups` removed, so no baseline can peek
at them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np

from ..clustering import ChunkedRows
from ..errors import UserError
from ..options import opt
from ..registry import Registry
from .formation import (
    channel_sums,
    check_heatmaps,
    check_rows,
    class_by_cluster,
    merge_easy_groups,
    pseudo_groups,
    split_by_components,
)


@dataclass(frozen=True)
class GroupContext:
    """What a group source may use. Arrays are per val point, in val order."""

    y_val: np.ndarray  # (N,) class labels
    clustering: Any  # spec.ClusteringSpec: method, k, k_max, scope, ...
    seed: int
    val_features: Optional[np.ndarray] = None  # (N, d) penultimate features of the ERM model
    val_logits: Optional[np.ndarray] = None  # (N, n_classes) ERM logits
    heatmaps: Optional[np.ndarray] = None  # (N, ...) heatmaps of the predicted class
    true_groups: Optional[np.ndarray] = None  # (N,) true groups: the `true` source (oracle) only
    random_k: Optional[int] = None  # `random`: groups per class; None = clustering.k if an int, else 2
    merge_easy: bool = False  # groups.merge_easy: merge_easy_groups after a label-free source
    split_ica: bool = False  # groups.split_ica: split_by_components after a label-free source (and merge_easy)


@dataclass(frozen=True)
class GroupSource:
    fn: Callable[[GroupContext], tuple[np.ndarray, dict]]
    needs: tuple[str, ...]  # GroupContext fields that must not be None
    oracle: bool = False  # only an oracle source is shown `true_groups`


def _entry(
    name: str, fn: Callable, keys: Optional[type] = None, needs: tuple[str, ...] = (), oracle: bool = False
) -> GroupSource:
    return GroupSource(fn, tuple(needs), oracle)


GROUP_SOURCES: Registry = Registry("group source", "groups.source", entry=_entry)
"""`@GROUP_SOURCES.register(NAME, needs=(GroupContext fields), oracle=False, keys=...)` on fn(ctx) ->
(groups, info)."""


def infer_groups(name: str, ctx: GroupContext) -> tuple[np.ndarray, dict]:
    """Run the registered source `name` on `ctx`; checks its inputs and hides the truth from non-oracles."""
    src: GroupSource = GROUP_SOURCES.get(name)
    needs = src.needs
    if name == "exmap":
        needs = {"features": ("val_features",), "both": ("heatmaps", "val_features")}.get(ctx.clustering.input, needs)
    missing = [f for f in needs if getattr(ctx, f) is None]
    if missing:
        raise UserError(f"group source '{name}' needs {', '.join(missing)}, which the caller did not provide")
    if not src.oracle:
        ctx = dataclasses.replace(ctx, true_groups=None)
    groups, info = src.fn(ctx)
    groups = np.asarray(groups, np.int64)
    if groups.shape != (len(ctx.y_val),):
        raise ValueError(f"group source '{name}' returned shape {groups.shape}, expected ({len(ctx.y_val)},)")
    if ctx.merge_easy and not src.oracle:
        if ctx.val_logits is None:
            raise UserError("groups.merge_easy needs ERM's val logits, which the caller did not provide")
        before = int(len(np.unique(groups)))
        groups, merged = merge_easy_groups(groups, ctx.y_val, ctx.val_logits)
        info = {**info, "merged_easy": merged, "n_groups_before_merge": before}
    if ctx.split_ica and not src.oracle:
        if ctx.val_features is None:
            raise UserError("groups.split_ica needs ERM's val features, which the caller did not provide")
        before = int(len(np.unique(groups)))
        groups, split = split_by_components(groups, ctx.val_features, ctx.seed, ctx.clustering.min_group_size)
        info = {**info, "split_ica": split, "n_groups_before_split": before}
    if (ctx.merge_easy or ctx.split_ica) and not src.oracle:
        info.pop("group_class_cluster", None)  # the source's (class, cluster) per group id: renumbered since
    ids, counts = np.unique(groups, return_counts=True)
    return groups, {
        "source": name,
        **info,
        "n_groups": int(len(ids)),
        "sizes": {int(g): int(c) for g, c in zip(ids, counts)},
    }


@GROUP_SOURCES.register("exmap", needs=("heatmaps",))
def exmap_groups(ctx: GroupContext) -> tuple[np.ndarray, dict]:
    """ExMap: cluster the heatmaps with `clustering.*` (scope, method, k); group = class x cluster."""
    what = ctx.clustering.input
    cross = correct = None
    crossing = [
        (k, v)
        for k, v in (("cross_spatial", ctx.clustering.cross_spatial), ("cross_features", ctx.clustering.cross_features))
        if v != "none"
    ]
    if crossing:  # (the spec allows one at a time, and neither with input features)
        key, mode = crossing[0]
        if mode == "hard":
            if ctx.val_logits is None:
                raise UserError(
                    f"clustering.{key}: hard needs ERM's val logits, which the caller did not "
                    f"provide; use {key}: all, or pass them"
                )
            correct = np.asarray(ctx.val_logits).argmax(1) == np.asarray(ctx.y_val)
        if key == "cross_features" and ctx.val_features is None:
            raise UserError("clustering.cross_features needs the val features, which the caller did not provide")
        cross = channel_sums(ctx.heatmaps) if key == "cross_spatial" else ctx.val_features
    if what == "features":
        return pseudo_groups(ctx.val_features, ctx.y_val, ctx.clustering, ctx.seed, what="features")
    if what == "both":
        return pseudo_groups(
            side_by_side(ctx.heatmaps, ctx.val_features),
            ctx.y_val,
            ctx.clustering,
            ctx.seed,
            what="heatmaps and features",
            cross=cross,
            correct=correct,
        )
    H = ctx.heatmaps  # an array, a memmap or a list of memory-mapped shards (millions): never stacked here
    if isinstance(H, np.ndarray):
        H = H.reshape(len(H), -1)  # a view, for a memmap too
    return pseudo_groups(H, ctx.y_val, ctx.clustering, ctx.seed, cross=cross, correct=correct)


def side_by_side(H, F) -> np.ndarray:
    """`clustering.input: both`: each heatmap row and each feature row divided by its own max |value|,
    then concatenated, so that neither block outweighs the other by its scale. Held in memory whole:
    N x (heatmap size + feature width) float32 (at a million 3x7x7 heatmaps and 512 features, 2.6 GB)."""
    check_heatmaps(H)
    check_rows(F, "features")
    return np.hstack([ChunkedRows(H, True).materialize(), ChunkedRows(F, True).materialize()])


@GROUP_SOURCES.register("features", needs=("val_features",))
def feature_groups(ctx: GroupContext) -> tuple[np.ndarray, dict]:
    """GEORGE-style: the same clusterer on penultimate features, each class clustered apart (local scope)."""
    cspec = dataclasses.replace(ctx.clustering, scope="local")
    return pseudo_groups(ctx.val_features, ctx.y_val, cspec, ctx.seed, what="features")


@GROUP_SOURCES.register("jtt_error_set", needs=("val_logits",))
def error_set_groups(ctx: GroupContext) -> tuple[np.ndarray, dict]:
    """JTT's error set as groups: 2 y + 1 where ERM misclassifies, 2 y where it is right.

    An error set smaller than `clustering.min_group_size` is folded back into its class's
    correct group (a 2-point group would starve group-balanced retraining); `merged` says so.
    """
    y = np.asarray(ctx.y_val, np.int64)
    wrong = (np.asarray(ctx.val_logits).argmax(1) != y).astype(np.int64)
    merged = []
    for c in np.unique(y):
        n_err = int(wrong[y == c].sum())
        if 0 < n_err < ctx.clustering.min_group_size:
            wrong[y == c] = 0
            merged.append({"class": int(c), "errors": n_err})
    return 2 * y + wrong, {"error_rate": float((np.asarray(ctx.val_logits).argmax(1) != y).mean()), "merged": merged}


@dataclass
class RandomKeys:
    """The random source's own key, in `groups:`."""

    random_k: Optional[int] = opt(
        None,
        "random source: groups per class; null = clustering.k when it is an integer, else 2",
        lambda v: None if v is None or v >= 1 else "an integer >= 1, or null",
    )


@GROUP_SOURCES.register("random", keys=RandomKeys)
def random_groups(ctx: GroupContext) -> tuple[np.ndarray, dict]:
    """Each class split at random into k equal-sized parts: class x random part. A floor any method must beat."""
    k = ctx.random_k or (ctx.clustering.k if isinstance(ctx.clustering.k, int) else 2)
    rng = np.random.default_rng([ctx.seed, 7])
    cluster_of = np.zeros(len(ctx.y_val), np.int64)
    for c in np.unique(ctx.y_val):
        idx = np.flatnonzero(ctx.y_val == c)
        cluster_of[rng.permutation(idx)] = np.arange(len(idx)) % k
    return class_by_cluster(np.asarray(ctx.y_val), cluster_of), {"k_per_class": int(k)}


@GROUP_SOURCES.register("class")
def class_groups(ctx: GroupContext) -> tuple[np.ndarray, dict]:
    """No group inference: group = class. For a retrainer that needs no groups (DPE without attribute
    labels then chooses by worst-class accuracy); with DFR it is class-balanced retraining."""
    return np.asarray(ctx.y_val, np.int64), {}


@GROUP_SOURCES.register("true", needs=("true_groups",), oracle=True)
def true_groups(ctx: GroupContext) -> tuple[np.ndarray, dict]:
    """The oracle: the true val groups (for the upper-bound row; never used for selection elsewhere)."""
    return np.asarray(ctx.true_groups, np.int64), {}
