"""Clustering at scale: the anchor route agrees with the exact one, memmaps and shards stream, the
faster k-means++ seeding and sweep score give the old answers. Sizes are small; no timings."""

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from exmap_ray import clustering
from exmap_ray.clustering import kmeanspp_init
from exmap_ray.clustering import scale as clustering_scale
from exmap_ray.groups import pseudo_groups
from exmap_ray.chunked import ChunkedRows, normalize_rows
from exmap_ray.clustering.scale import (
    NearestAnchors,
    anchor_spectrum,
    float16_roundtrip,
    planted_centres,
    planted_heatmaps,
)
from exmap_ray.selection import prepare_groupings, worst_over_groupings_halves
from exmap_ray.spec import ClusteringSpec

SPECTRAL = ClusteringSpec(method="spectral", k="auto", scope="global")


@pytest.fixture(scope="module")
def planted():
    H, truth = planted_heatmaps(6000, minority=0.02, seed=1)
    return H, truth


def _route(monkeypatch, route):
    monkeypatch.setattr(clustering.scale, "SCALE_MIN_N", {"anchor": 2, "exact": 1 << 62}[route])


def test_anchor_route_matches_the_exact_path(planted, monkeypatch):
    H, truth = planted
    y = truth // 2
    _route(monkeypatch, "exact")
    exact, ie = pseudo_groups(H, y, SPECTRAL, seed=0)
    _route(monkeypatch, "anchor")
    anchor, ia = pseudo_groups(H, y, SPECTRAL, seed=0)
    assert ia["scopes"]["global"]["route"] == "anchor" and "route" not in ie["scopes"]["global"]
    assert ia["scopes"]["global"]["k"] == ie["scopes"]["global"]["k"] == 4  # the same eigengap k
    assert adjusted_rand_score(exact, anchor) >= 0.99
    assert adjusted_rand_score(truth, anchor) >= 0.99  # both 2% minorities found


def test_below_the_threshold_the_exact_path_runs(planted):
    H, truth = planted
    assert len(H) < clustering.scale.SCALE_MIN_N
    _, info = pseudo_groups(H, truth // 2, SPECTRAL, seed=0)
    assert "route" not in info["scopes"]["global"]


@pytest.mark.parametrize("route", ["anchor", "exact"])
def test_memmaps_and_shards_give_the_in_memory_answer(planted, tmp_path, monkeypatch, route):
    H, truth = planted
    y = truth // 2
    _route(monkeypatch, route)
    np.save(tmp_path / "h.npy", H)
    mm = np.load(tmp_path / "h.npy", mmap_mode="r")
    ref, info = pseudo_groups(H, y, SPECTRAL, seed=0)
    for given in (mm, [mm[:2500], mm[2500:4000], mm[4000:]]):
        labels, other = pseudo_groups(given, y, SPECTRAL, seed=0)
        a, b = other["scopes"]["global"], info["scopes"]["global"]
        assert np.array_equal(labels, ref) and a["k"] == b["k"]  # FAISS's batch blocking may move a last digit
        np.testing.assert_allclose(a["eigenvalues"], b["eigenvalues"], atol=1e-5)


@pytest.mark.parametrize("seed", range(3))
def test_k_and_groups_do_not_move_with_n(monkeypatch, seed):
    """Issue 31: the same data at 4x the rows gives the same spectrum, k and groups (the anchors come from a
    sample of fixed size, and the rows averaged into them do not vote). A 200-anchor budget keeps it fast;
    from 20 x 200 rows on the budget, not N, sets the anchors, as from SCALE_MIN_N rows with 1,000."""
    _route(monkeypatch, "anchor")
    monkeypatch.setattr(clustering_scale, "N_ANCHORS", 200)
    seen = []
    for n in (10_000, 40_000):
        X, truth = planted_centres(n, seed=seed)
        labels, info = pseudo_groups(X, truth // 2, SPECTRAL, seed=0)
        s = info["scopes"]["global"]
        assert s["route"] == "anchor" and s["anchors"] >= 190
        assert s["k"] == 2 and adjusted_rand_score(truth, labels) >= 0.99  # class x pattern, not a cluster split
        seen.append(np.array(s["eigenvalues"][:6]))
    np.testing.assert_allclose(seen[0], seen[1], atol=0.05)


def test_k_does_not_move_with_n_at_the_default_budget():
    """The same at the shipped settings, on rows that take the anchor route by their number alone."""
    ks = []
    for n in (60_000, 240_000):
        X, truth = planted_centres(n, seed=0)
        labels, info = pseudo_groups(X, truth // 2, SPECTRAL, seed=0)
        assert info["scopes"]["global"]["route"] == "anchor" and adjusted_rand_score(truth, labels) >= 0.99
        ks.append(info["scopes"]["global"]["k"])
    assert ks == [2, 2]


def test_rows_stream_subsets_and_normalise_like_the_whole(planted):
    H, _ = planted
    X = normalize_rows(H)
    rows = ChunkedRows([H[:1000], H[1000:]], normalize=True)
    idx = np.array([3, 999, 1000, 4242])
    np.testing.assert_array_equal(rows.take(idx), X[idx])
    np.testing.assert_array_equal(rows.subset(idx).materialize(), X[idx])
    np.testing.assert_array_equal(np.concatenate([c for _, c in rows.chunks(size=700)]), X)
    spans = rows.spans(size=700)  # none across the shard boundary at 1000, so each is one read
    assert (700, 1000) in spans and (1000, 1700) in spans and spans[-1][1] == len(X)
    np.testing.assert_array_equal(rows.read(700, 1000), X[700:1000])
    sub = rows.subset(np.arange(500, 1500))
    np.testing.assert_array_equal(np.concatenate([sub.read(a, b) for a, b in sub.spans(size=300)]), X[500:1500])
    np.testing.assert_allclose(rows.mean(idx), X[idx].mean(0), rtol=1e-5)


def test_anchor_spectrum_is_a_normalised_laplacians(planted):
    spec = anchor_spectrum(ChunkedRows(planted[0], normalize=True), seed=0)
    eig = spec.eigenvalues
    assert eig[0] == pytest.approx(0.0, abs=1e-6) and np.all(np.diff(eig) >= -1e-9) and eig.max() <= 2
    np.testing.assert_allclose(spec.weight.sum(1), 1.0, rtol=1e-5)
    emb = spec.embed(3)  # the first eigenvector of I - W is constant (W has unit degrees)
    assert emb.shape == (len(planted[0]), 3) and np.ptp(emb[:, 0]) < 1e-3 * np.abs(emb[:, 0]).mean()


def test_a_small_far_minority_keeps_its_own_anchor(monkeypatch):
    """0.3% of the rows, far away: D^2 seeding gives it an anchor, and it comes out as its own group."""
    _route(monkeypatch, "anchor")
    rng = np.random.default_rng(0)
    X = np.concatenate(
        [rng.normal(0, 1, (4000, 20)), rng.normal(0, 1, (4000, 20)) + 8, rng.normal(0, 1, (24, 20)) - 8]
    ).astype(np.float32)
    truth = np.repeat([0, 1, 2], [4000, 4000, 24])
    spec = ClusteringSpec(method="spectral", k="auto", scope="global", normalize=False)
    labels, info = clustering.cluster(ChunkedRows(X, normalize=False), spec, seed=0)
    assert info["route"] == "anchor" and info["k"] == 3 and adjusted_rand_score(truth, labels) == pytest.approx(1.0)


def test_float16_roundtrip_is_a_float16_store(planted):
    H, truth = planted
    back = float16_roundtrip(H)
    assert back.dtype == np.float32 and back.shape == (len(H), 147)
    np.testing.assert_array_equal(back, H.reshape(len(H), -1).astype(np.float16).astype(np.float32))
    a, _ = pseudo_groups(H, truth // 2, SPECTRAL, seed=0)
    b, _ = pseudo_groups(back, truth // 2, SPECTRAL, seed=0)
    assert adjusted_rand_score(a, b) >= 0.99


def _old_kmeanspp(X, k, rng):  # the seeding before the GEMV rewrite, kept here as the reference
    centers = np.empty((k, X.shape[1]), np.float32)
    centers[0] = X[rng.integers(len(X))]
    d2 = ((X - centers[0]) ** 2).sum(1)
    for i in range(1, k):
        total = float(d2.sum())
        j = rng.choice(len(X), p=d2 / total) if total > 0 else rng.integers(len(X))
        centers[i] = X[j]
        d2 = np.minimum(d2, ((X - centers[i]) ** 2).sum(1))
    return centers


@pytest.mark.parametrize("seed", range(4))
def test_kmeanspp_seeds_are_the_old_ones(planted, seed):
    X = normalize_rows(planted[0])
    for k in (2, 5, 8):
        np.testing.assert_array_equal(
            kmeanspp_init(X, k, np.random.default_rng(seed)), _old_kmeanspp(X, k, np.random.default_rng(seed))
        )


def _old_worst_over_groupings_halves(heldout_idx, heldout_pred, y, groupings, min_members=3):
    """The O(T^2 N G) original, kept here as the reference the bincount version must equal."""
    best_mean, best_halves, best_sizes = float("nan"), np.array([]), np.array([])
    for g in groupings:
        per_half, sizes = [], []
        for idx, pred in zip(heldout_idx, heldout_pred):
            accs = [
                (float((pred[g[idx] == k] == y[idx][g[idx] == k]).mean()), k)
                for k in np.unique(g[idx])
                if (g[idx] == k).sum() >= min_members
            ]
            if accs:
                acc, k = min(accs)
                per_half.append(acc)
                sizes.append(int((g == k).sum()))
        if per_half and not (float(np.mean(per_half)) >= best_mean):
            best_mean, best_halves, best_sizes = float(np.mean(per_half)), np.array(per_half), np.array(sizes)
    return best_mean, best_halves, best_sizes


@pytest.mark.parametrize("seed", range(5))
def test_sweep_score_equals_the_old_one(seed):
    rng = np.random.default_rng(seed)
    n, trials = 120, 6
    y = rng.integers(0, 2, n)
    groupings = [y * 3 + rng.integers(0, 1 + t % 3, n) for t in range(trials)]
    groupings += [groupings[1].copy(), (groupings[2] + 7) * 2]  # a duplicate and a relabelled copy
    groupings.append(np.where(rng.random(n) < 0.03, 99, groupings[0]))  # groups below min_members on a half
    prepared = prepare_groupings(groupings)
    assert len(prepared.codes) == len({g.tobytes() for g in groupings}) < len(groupings)
    for t in range(trials):
        idx = np.stack([np.sort(rng.choice(n, n // 2, replace=False)) for _ in range(4)])
        pred = np.where(rng.random(idx.shape) < 0.2 + 0.1 * t, 1 - y[idx], y[idx])
        for min_members in (1, 3):
            old = _old_worst_over_groupings_halves(idx, pred, y, groupings, min_members)
            for gs in (groupings, prepared):
                new = worst_over_groupings_halves(idx, pred, y, gs, min_members)
                assert new[0] == old[0]
                np.testing.assert_array_equal(new[1], old[1])
                np.testing.assert_array_equal(new[2], old[2])


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param("cuda:0", marks=[pytest.mark.gpu, pytest.mark.skipif(not _cuda(), reason="needs a CUDA GPU")]),
    ],
)
def test_gpu_nearest_anchors_match_the_cpu(planted, device):
    """The GPU route's nearest-anchor search (clustering_device: FAISS's GPU build, else torch; on "cpu"
    the torch route on the CPU, as under EXMAP_RAY_FAKE_CUDA) against FAISS's CPU search."""
    import faiss

    from exmap_ray.clustering.device import clustering_device

    X = normalize_rows(planted[0])
    anchors = X[::50].copy()
    with clustering_device(device):
        gpu = NearestAnchors(anchors, 5)
    assert gpu.torch is not None or not isinstance(gpu.index, faiss.IndexFlatL2)  # it took the GPU route
    cpu = faiss.IndexFlatL2(X.shape[1])
    cpu.add(anchors)
    D0, I0 = cpu.search(X, 5)
    D1, I1 = gpu(X)
    assert (I0 == I1).mean() > 0.999
    np.testing.assert_allclose(D0, D1, rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda(), reason="needs a CUDA GPU")
def test_gpu_anchor_route_matches_the_exact_path(planted, monkeypatch):
    from exmap_ray.clustering.device import clustering_device

    H, truth = planted
    _route(monkeypatch, "anchor")
    with clustering_device("cuda:0"):  # as the clusters stage sets it on a GPU run
        labels, info = pseudo_groups(H, truth // 2, SPECTRAL, seed=0)
    assert info["scopes"]["global"]["k"] == 4 and adjusted_rand_score(truth, labels) >= 0.99


def test_sweep_summary_scores_every_trial_as_before(tmp_path):
    """`tune.add_sweep_metric` over saved selection files equals the old all-pairs loop."""
    from exmap_ray.selection import score_se
    from exmap_ray.tune import SWEEP_METRIC, add_sweep_metric

    rng = np.random.default_rng(7)
    n = 200
    y = rng.integers(0, 2, n)
    clusterings = [y * 2 + rng.integers(0, 2, n), y * 3 + rng.integers(0, 3, n)]
    rows, saved = [], []
    for t in range(6):  # 6 trials sharing 2 clusterings (a DFR-only sweep axis), one bucket
        d = {
            "y": y,
            "pseudo_groups": clusterings[t % 2],
            "heldout_idx": np.stack([np.sort(rng.choice(n, n // 2, replace=False)) for _ in range(3)]),
        }
        d["heldout_pred"] = np.where(
            rng.random(d["heldout_idx"].shape) < 0.1 * (t + 1), 1 - y[d["heldout_idx"]], y[d["heldout_idx"]]
        )
        np.savez(tmp_path / f"t{t}.npz", **d)
        rows.append({"trial": f"t{t}", "status": "OK", "selection_file": str(tmp_path / f"t{t}.npz")})
        saved.append(d)
    add_sweep_metric(rows, SWEEP_METRIC, "binomial")
    for r, d in zip(rows, saved):
        score, halves, sizes = _old_worst_over_groupings_halves(
            d["heldout_idx"], d["heldout_pred"], y, [s["pseudo_groups"] for s in saved]
        )
        assert r[SWEEP_METRIC] == r["selection_metric"] == score
        assert r["selection_se"] == score_se(score, halves, sizes, "binomial")


def test_joint_restarts_match_faiss_kmeans(monkeypatch):
    """From SCALE_MIN_N rows k-means runs its restarts together; same clusters and inertia as FAISS's."""
    rng = np.random.default_rng(3)
    X = np.concatenate([rng.normal(c, 1.0, (n, 12)) for c, n in ((0, 3000), (4, 2000), (-4, 60))]).astype(np.float32)

    def inertia(labels):
        return sum(float(((X[labels == j] - X[labels == j].mean(0)) ** 2).sum()) for j in np.unique(labels))

    monkeypatch.setattr(clustering.scale, "SCALE_MIN_N", 1 << 62)
    ref = clustering.kmeans(X, 3, niter=25, nredo=3, seed=0)
    monkeypatch.setattr(clustering.scale, "SCALE_MIN_N", 2)
    joint = clustering.kmeans(X, 3, niter=25, nredo=3, seed=0)
    assert adjusted_rand_score(ref, joint) == pytest.approx(1.0)
    assert inertia(joint) <= inertia(ref) * (1 + 1e-4)
    single = clustering.kmeans_joint(X, [X[:3].copy()], niter=2)  # one restart, fewer iterations than JOINT_ITERS
    assert single.dtype == np.int64 and set(np.unique(single)) <= {0, 1, 2}
