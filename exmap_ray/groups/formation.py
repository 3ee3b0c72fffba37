"""Pseudo-group formation: a point's pseudo group is (class, cluster), numbered densely; the input checks,
the channel-sum crossing (`clustering.cross_spatial`), and the merging of small and easy groups.

    from exmap_ray.groups.formation import pseudo_groups
    groups, info = pseudo_groups(heatmaps.reshape(n, -1), y_val, spec.clustering, seed=0)

Heatmaps may be an np.memmap or a list of shards. A scope of `SCALE_MIN_N` points or more takes the
scalable route (clustering/scale.py), streamed in chunks, never a whole copy.
"""

from __future__ import annotations

import logging

import numpy as np

from ..clustering import ChunkedRows, cluster, scale
from ..errors import DataError, UserError

log = logging.getLogger(__name__)


def _each_chunk(H):
    """(N, d) float32 chunks of an array, memmap or list of shards, as stored (not normalised)."""
    return (X for _, X in ChunkedRows(H, normalize=False).chunks())


def _n_rows(H) -> int:
    return len(H) if isinstance(H, np.ndarray) else sum(len(s) for s in H)


def check_heatmaps(H: np.ndarray) -> None:
    """Refuse heatmaps that cannot be clustered: any NaN/inf, or every one all zero (a dead model)."""
    n = _n_rows(H)
    if n == 0:
        raise DataError("no heatmaps to cluster: the val split is empty")
    bad = sum(int((~np.isfinite(X)).any(axis=1).sum()) for X in _each_chunk(H))
    if bad:
        raise DataError(
            f"{bad} of {n} heatmaps contain NaN or inf values; nothing sensible can be "
            f"clustered. Likely causes: ERM diverged (lower erm.lr, check the ERM loss/accuracy) "
            f"or the heatmap method is unstable for this backbone (raise heatmaps.epsilon or "
            f"try heatmaps.method input_x_gradient)"
        )
    if not any(X.any() for X in _each_chunk(H)):
        raise DataError(
            f"all {n} heatmaps are all zero: the model explains nothing. Likely causes: "
            f"ERM collapsed to a constant prediction (a dead model: check the ERM stage's "
            f"accuracy, lower erm.lr) or the wrong heatmap method for this backbone "
            f"(try heatmaps.method input_x_gradient or gradcam)"
        )


def check_rows(X: np.ndarray, what: str) -> None:
    """Refuse rows (e.g. penultimate features) that are empty or hold NaN/inf, naming `what`."""
    n = _n_rows(X)
    if n == 0:
        raise DataError(f"no {what} to cluster: the val split is empty")
    bad = sum(int((~np.isfinite(C)).any(axis=1).sum()) for C in _each_chunk(X))
    if bad:
        raise DataError(
            f"{bad} of {n} rows of {what} contain NaN or inf values; nothing sensible can be "
            f"clustered (did ERM diverge? check the ERM loss/accuracy)"
        )


def channel_sums(H) -> np.ndarray:
    """`clustering.cross_spatial`'s rows: each (C, h, w) heatmap summed over its channels, (N, h * w) float32.

    Where the relevance lies, whichever channel carries it (the usual way an LRP map is shown). `H` is an
    (N, C, h, w) array, memmap or list of such shards, read in chunks: the result is one N x h*w copy
    (a million 14x14 maps: 0.8 GB)."""
    shards = [H] if isinstance(H, np.ndarray) else list(H)
    if not shards or any(np.ndim(s) != 4 for s in shards):
        shapes = sorted({tuple(np.shape(s)[1:]) for s in shards})
        raise UserError(
            f"clustering.cross_spatial sums each heatmap over its channels, so it needs heatmaps of "
            f"shape (N, channels, height, width); these are {shapes or 'empty'} per point. Set "
            f"clustering.cross_spatial: none (every shipped heatmaps.method gives that shape; with "
            f"gradcam's single channel the crossing changes nothing)"
        )
    rows = ChunkedRows(shards, normalize=False)
    c = shards[0].shape[1]
    out = np.empty((len(rows), rows.d // c), np.float32)
    for lo, X in rows.chunks():
        out[lo : lo + len(X)] = X.reshape(len(X), c, -1).sum(1)
    return out


def _scope_rows(H, normalize: bool):
    """What the clusterer reads: one in-memory copy below SCALE_MIN_N rows (the exact path), else `ChunkedRows`."""
    rows = ChunkedRows(H, normalize)
    return rows.materialize() if len(rows) < scale.SCALE_MIN_N else rows


def _cluster_scopes(X, y: np.ndarray, cspec, seed: int) -> tuple[np.ndarray, dict]:
    """Cluster ids per point (each scope numbered from 0) and each scope's info: per class (local) or global."""
    if cspec.scope != "local":
        labels, info = cluster(X, cspec, seed)
        return labels, {"global": info}
    cluster_of, scopes = np.zeros(len(X), np.int64), {}
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        labels, info = cluster(X[idx] if isinstance(X, np.ndarray) else X.subset(idx), cspec, seed + int(c))
        cluster_of[idx] = labels
        scopes[f"class {int(c)}"] = info
    return cluster_of, scopes


def pseudo_groups(
    H: np.ndarray,
    y: np.ndarray,
    cspec,
    seed: int,
    what: str = "heatmaps",
    cross=None,
    correct: np.ndarray | None = None,
) -> tuple[np.ndarray, dict]:
    """Pseudo group per point = (class, cluster), numbered densely 0..G-1.

    `H` is any (N, ...) array, flattened per row: heatmaps by default, or penultimate features
    (pass `what="features"`: the input checks then speak of features, not heatmaps). It may be an
    np.memmap or a list of shards: from SCALE_MIN_N rows on it is read in chunks, never copied whole
    (except by clusterers without a scalable route).
    `cross`: other (N, d) rows of the same points (`clustering.cross_spatial`: the heatmaps' channel
    sums), clustered the same way; a point's cluster is then the pair (its cluster, its cluster in
    `cross`), so a second structure the first clustering left inside its clusters splits them.
    `correct` (N,) bool, with `cross` (`cross_spatial: hard`): whether ERM got each point right; within
    each (class, cluster) the parts `cross` cuts it into stay apart only where ERM's accuracy on them is
    below its accuracy on the whole (class, cluster); the others stay together.
    Returns the labels and a dict with each scope's chosen k and the (class, cluster) of each group.
    """
    check_heatmaps(H) if what == "heatmaps" else check_rows(H, what)
    y = np.asarray(y)
    X = _scope_rows(H, cspec.normalize)  # below SCALE_MIN_N: the exact path, as ever
    cluster_of, scopes = _cluster_scopes(X, y, cspec, seed)
    crossed = None
    if cross is not None:
        other, crossed = _cluster_scopes(_scope_rows(cross, cspec.normalize), y, cspec, seed)
        if correct is not None:
            other, crossed["kept_apart"] = keep_hard_parts(y, cluster_of, other, np.asarray(correct, bool))
        _, cluster_of = np.unique(cluster_of * (int(other.max()) + 1) + other, return_inverse=True)
        cluster_of = cluster_of.ravel().astype(np.int64)
    cluster_of, merges = merge_small(X, y, cluster_of, cspec.min_group_size)
    classes, ycode = np.unique(y, return_inverse=True)  # (class, cluster) pairs in sorted order, numbered densely
    base = int(cluster_of.max()) + 1
    keys, groups = np.unique(ycode.ravel() * base + cluster_of, return_inverse=True)
    groups = groups.ravel().astype(np.int64)
    pairs = list(zip(classes[keys // base].tolist(), (keys % base).tolist()))
    sizes = np.bincount(groups, minlength=len(pairs))
    log.info(
        "clustering: %s/%s -> %d pseudo groups, sizes %s%s",
        cspec.method,
        cspec.scope,
        len(pairs),
        sizes.tolist(),
        f" ({len(merges)} small fragment(s) merged)" if merges else "",
    )
    info = {
        "scopes": scopes,
        "n_groups": len(pairs),
        "group_class_cluster": pairs,
        "sizes": sizes.tolist(),
        "merged": merges,
    }
    if crossed is not None:
        info["cross_scopes"] = crossed
    return groups, info


def keep_hard_parts(
    y: np.ndarray, cluster_of: np.ndarray, part: np.ndarray, correct: np.ndarray
) -> tuple[np.ndarray, int]:
    """`cross_spatial: hard`: within each (class, cluster), the parts (ids in `part`) on which ERM's
    accuracy is at least its accuracy on the whole (class, cluster) become one part, id 0; the harder
    parts keep their own ids (shifted by 1). Returns the new part ids and how many parts were kept apart."""
    out = part.astype(np.int64) + 1
    kept = 0
    parent = np.unique(np.stack([y, cluster_of], 1), axis=0, return_inverse=True)[1].ravel()
    for p in np.unique(parent):
        m = parent == p
        acc = correct[m].mean()
        for q in np.unique(part[m]):
            mm = m & (part == q)
            if correct[mm].mean() >= acc:
                out[mm] = 0
            else:
                kept += 1
    return out, kept


def merge_small(
    X: np.ndarray | ChunkedRows, y: np.ndarray, cluster_of: np.ndarray, min_size: int
) -> tuple[np.ndarray, list]:
    """Merge (class, cluster) groups under `min_size` into the nearest same-class group by centroid.

    DFR subsamples every group to the smallest one, so a 2-member fragment would
    leave it 2 examples per group. A class with a single group is left alone.
    Centroids are kept until their group changes (`ChunkedRows`: one chunked read per group).
    """
    cluster_of = cluster_of.copy()
    merges = []
    for c in np.unique(y):
        cache: dict = {}
        while True:
            idx = np.flatnonzero(y == c)
            ks, counts = np.unique(cluster_of[idx], return_counts=True)
            if len(ks) < 2 or counts.min() >= min_size:
                break
            small = ks[np.argmin(counts)]

            def centroid(k):
                if k not in cache:
                    members = idx[cluster_of[idx] == k]
                    cache[k] = X.mean(members) if isinstance(X, ChunkedRows) else X[members].mean(0)
                return cache[k]

            others = [k for k in ks if k != small]
            target = min(others, key=lambda k: float(((centroid(k) - centroid(small)) ** 2).sum()))
            cluster_of[idx[cluster_of[idx] == small]] = target
            cache.pop(target, None)
            cache.pop(small, None)
            merges.append({"class": int(c), "cluster": int(small), "size": int(counts.min()), "into": int(target)})
    return cluster_of, merges


def merge_easy_groups(groups: np.ndarray, y: np.ndarray, val_logits: np.ndarray) -> tuple[np.ndarray, dict]:
    """`groups.merge_easy`: within each class, the groups on which ERM's val accuracy is at least its
    accuracy on the whole class become one group; the harder ones stay. Uses the class labels and ERM's
    predictions only, as DFR does. Returns dense ids (in the old ids' order) and, per class, the old ids
    merged (classes with fewer than two easy groups are left alone)."""
    groups = np.asarray(groups)
    correct = np.asarray(val_logits).argmax(1) == y
    out, merged = groups.copy(), {}
    for c in np.unique(y):
        in_c = y == c
        class_acc = correct[in_c].mean()
        easy = [int(g) for g in np.unique(groups[in_c]) if correct[in_c & (groups == g)].mean() >= class_acc]
        if len(easy) > 1:
            out[in_c & np.isin(groups, easy)] = min(easy)
            merged[int(c)] = easy
    _, dense = np.unique(out, return_inverse=True)
    return dense.ravel().astype(np.int64), merged


def class_by_cluster(y: np.ndarray, cluster_of: np.ndarray) -> np.ndarray:
    """Dense ids 0..G-1 for the (class, cluster) pairs, ordered by class then cluster."""
    pairs = np.stack([y, cluster_of], 1)
    _, ids = np.unique(pairs, axis=0, return_inverse=True)
    return ids.ravel().astype(np.int64)


# `groups.split_ica`: a second shortcut the clustering left inside its groups. Within a (class, first
# shortcut) group a weaker shortcut is a minority of a few to a quarter of the points. It is linearly
# present in ERM's features but is not their largest variance (digit shape is), so k-means or a GMM on
# the group does not cut along it. An independent component that is cleanly two-moded does.
SPLIT_MIN_MEMBERS = 100  # groups smaller than this are not searched (too few points to estimate 20 components)
SPLIT_DIMS = 20  # PCA dimensions kept before ICA, within each searched group
SPLIT_MIN_SEPARATION = 3.0  # Ashman's D of the two modes: |m1 - m2| * sqrt(2) / sqrt(s1^2 + s2^2)
SPLIT_SHARE = (0.03, 0.25)  # the smaller mode's share of the group: a minority, not a half/half split
SPLIT_FIT_MAX = 20_000  # PCA and ICA are fitted on at most this many points of a group, then applied to all
SPLIT_ICA_ITER = 200  # FastICA iterations; where it has not converged no component is cleanly two-moded
SPLIT_SAME = 0.5  # an attribute whose labels agree with an earlier one's (|ARI| above this) is dropped


def _two_modes(s: np.ndarray, seed: int):
    """A 1-D GMM with two components on `s`: (Ashman's D, the smaller mode's share, the fitted GMM)."""
    from sklearn.mixture import GaussianMixture

    gm = GaussianMixture(2, n_init=2, random_state=seed).fit(s[:, None])
    mu, sd = gm.means_.ravel(), np.sqrt(gm.covariances_.ravel())
    d = abs(mu[0] - mu[1]) * np.sqrt(2.0) / max(float(np.sqrt(sd[0] ** 2 + sd[1] ** 2)), 1e-12)
    lab = gm.predict(s[:, None])
    return float(d), float(min(lab.mean(), 1 - lab.mean())), gm


def split_by_components(groups: np.ndarray, X: np.ndarray, seed: int, min_size: int) -> tuple[np.ndarray, dict]:
    """`groups.split_ica`: cross the pseudo groups with binary attributes found in ERM's val features `X`.

    In each group of at least SPLIT_MIN_MEMBERS points: PCA to SPLIT_DIMS dimensions, then FastICA; each
    independent component gets a two-mode 1-D GMM, and the component whose modes are furthest apart
    (Ashman's D), with a minority share in SPLIT_SHARE, becomes an attribute if its D reaches
    SPLIT_MIN_SEPARATION. The attribute labels every val point (the group's PCA, ICA and GMM applied to
    all rows), since a shortcut shared across groups also splits the small groups, where it could not be
    found. Attributes that repeat an earlier one are dropped; every group is then split by every attribute,
    and fragments under `min_size` (clustering.min_group_size) merge into the nearest part of the group they
    came from (`merge_small` with the old groups as its classes), so a split never mixes two old groups.
    Uses the groups and features only (a pseudo group lies in one class). Returns dense ids and what was
    found per searched group."""
    import warnings

    from sklearn.decomposition import PCA, FastICA
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.metrics import adjusted_rand_score

    groups = np.asarray(groups)
    X = np.asarray(X, np.float64).reshape(len(groups), -1)
    rng = np.random.default_rng(seed)
    attrs, found = [], []
    for g in np.unique(groups):
        idx = np.flatnonzero(groups == g)
        if len(idx) < SPLIT_MIN_MEMBERS:
            continue
        fit = idx if len(idx) <= SPLIT_FIT_MAX else np.sort(rng.choice(idx, SPLIT_FIT_MAX, replace=False))
        dims = min(SPLIT_DIMS, len(fit) - 1, X.shape[1])
        pca = PCA(dims, random_state=seed).fit(X[fit])
        with warnings.catch_warnings():  # no non-Gaussian direction (nothing to find) leaves ICA unconverged
            warnings.simplefilter("ignore", ConvergenceWarning)
            ica = FastICA(dims, random_state=seed, max_iter=SPLIT_ICA_ITER, whiten="unit-variance")
            ica.fit(pca.transform(X[fit]))
        S = ica.transform(pca.transform(X[idx]))
        best = None
        for j in range(dims):
            d, share, gm = _two_modes(S[:, j], seed)
            if SPLIT_SHARE[0] <= share <= SPLIT_SHARE[1] and share * len(idx) >= min_size:
                if best is None or d > best[0]:
                    best = (d, share, j, gm)
        record = {"group": int(g), "members": int(len(idx))}
        if best is not None:
            record.update(separation=round(best[0], 2), share=round(best[1], 3))
        if best is not None and best[0] >= SPLIT_MIN_SEPARATION:
            d, share, j, gm = best
            lab = gm.predict(ica.transform(pca.transform(X))[:, [j]]).astype(np.int64)
            same = [i for i, a in enumerate(attrs) if abs(adjusted_rand_score(a, lab)) > SPLIT_SAME]
            record["attribute"] = same[0] if same else len(attrs)
            if not same:
                attrs.append(lab)
        found.append(record)
    out = groups.astype(np.int64)
    for a in attrs:
        out = out * 2 + a
    merges = []
    if attrs:
        out, merges = merge_small(X, groups, out, min_size)  # within each old group
    _, dense = np.unique(out, return_inverse=True)
    dense = dense.ravel().astype(np.int64)
    log.info(
        "groups.split_ica: %d attribute(s) from %d searched group(s); %d -> %d groups",
        len(attrs),
        len(found),
        len(np.unique(groups)),
        len(np.unique(dense)),
    )
    return dense, {"attributes": len(attrs), "searched": found, "merged": merges}
