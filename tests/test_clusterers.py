"""The clusterer registry: silhouette-selected k-means and BIC-selected GMM, on any (N, d) rows."""

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from exmap_ray.clustering import cluster
from exmap_ray.groups import pseudo_groups
from exmap_ray.errors import DataError, SpecError
from exmap_ray.spec import ClusteringSpec, from_dict


def blobs(sizes, d=6, seed=0, scales=None):
    """Gaussian blobs with per-blob, per-dimension (diagonal) spreads."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(len(sizes), d)) * 4
    scales = scales or [0.3] * len(sizes)
    X = np.concatenate(
        [c + s * rng.uniform(0.5, 1.5, d) * rng.normal(size=(n, d)) for c, n, s in zip(centers, sizes, scales)]
    )
    return X.astype(np.float32), np.repeat(np.arange(len(sizes)), sizes)


def test_the_spec_validates_clustering_keys():
    assert from_dict({"clustering": {"method": "gmm", "input": "features"}}).clustering.input == "features"
    assert from_dict({}).clustering.input == "heatmaps"
    with pytest.raises(
        SpecError,
        match=r"clustering.method': unknown clusterer 'gmn'. Registered: gmm, kmeans"
        r".*Did you mean 'gmm'\?",
    ):
        from_dict({"clustering": {"method": "gmn"}})
    with pytest.raises(SpecError, match=r"clustering.input"):
        from_dict({"clustering": {"input": "logits"}})


@pytest.mark.parametrize("k", [2, 3, 5])
def test_kmeans_silhouette_finds_the_planted_k(k):
    X, truth = blobs([80] * k, seed=k)
    labels, info = cluster(X, ClusteringSpec(method="kmeans_silhouette", k="auto", k_max=8), seed=0)
    assert info["k"] == k and adjusted_rand_score(truth, labels) == pytest.approx(1.0)
    # the chosen k has the best silhouette of all the candidates 2..k_max
    assert max(info["silhouette"], key=info["silhouette"].get) == str(k) and len(info["silhouette"]) == 7


def test_the_silhouettes_equal_sklearns_on_its_sample():
    """One distance matrix for every labelling gives sklearn's silhouette_score, sample included (points
    beyond the sample size, a singleton cluster, a labelling with one cluster among the sampled points)."""
    from sklearn.metrics import silhouette_score

    from exmap_ray.clustering.clusterers import silhouettes
    from exmap_ray.clustering.kmeans import kmeans

    X, _ = blobs([150, 90, 60], d=12, seed=3)
    runs = {k: kmeans(X, k, 25, 3, seed=0) for k in range(2, 7)}
    runs["singleton"] = np.r_[np.zeros(len(X) - 1, int), 1]
    for sample, seed in ((len(X), 0), (200, 7)):
        got = silhouettes(X, runs, sample, seed)
        for k, labels in runs.items():
            want = silhouette_score(X, labels, sample_size=sample, random_state=seed)
            assert got[k] == pytest.approx(want, abs=1e-6), (k, sample)
    one = {"one": np.zeros(len(X), int)}
    assert silhouettes(X, one, 100, 0) == {"one": -1.0}


def test_faiss_kmeans_gives_the_same_labels_on_one_thread_or_two():
    """Small inputs run FAISS on one OpenMP thread (faster on 2 cores); the labels are those of two
    threads, and the caller's thread count is restored."""
    import importlib

    import faiss

    km = importlib.import_module("exmap_ray.clustering.kmeans")  # the module (the package exports the function)

    X, _ = blobs([300, 200, 100], d=40, seed=4)
    before = faiss.omp_get_max_threads()
    small = {k: km.kmeans(X, k, 25, 3, seed=1) for k in (2, 3, 5)}
    assert faiss.omp_get_max_threads() == before
    limit = km.FAISS_ONE_THREAD_MAX
    km.FAISS_ONE_THREAD_MAX = 0  # every input counts as large: FAISS's own thread count
    try:
        large = {k: km.kmeans(X, k, 25, 3, seed=1) for k in (2, 3, 5)}
    finally:
        km.FAISS_ONE_THREAD_MAX = limit
    assert all((small[k] == large[k]).all() for k in small)


@pytest.mark.parametrize("k", [2, 4])
def test_gmm_bic_finds_the_planted_k_with_unequal_spreads(k):
    X, truth = blobs([120, 60, 90, 40][:k], seed=10 + k, scales=[0.2, 0.6, 0.3, 0.8][:k])
    labels, info = cluster(X, ClusteringSpec(method="gmm", k="auto", k_max=7), seed=0)
    assert info["k"] == k and min(info["bic"], key=info["bic"].get) == str(k)
    assert adjusted_rand_score(truth, labels) == pytest.approx(1.0)
    assert labels.dtype == np.int64 and set(labels.tolist()) == set(range(info["k_used"]))


@pytest.mark.parametrize("method", ["gmm", "kmeans_silhouette"])
def test_an_integer_k_is_used_as_given(method):
    X, _ = blobs([50, 50, 50], seed=3)
    labels, info = cluster(X, ClusteringSpec(method=method, k=4), seed=0)
    assert info["k"] == 4 and len(np.unique(labels)) <= 4 and "bic" not in info and "silhouette" not in info


def test_any_rows_cluster_into_class_by_cluster_groups():
    """Penultimate-feature-like rows (2 classes x 2 latent subgroups, one small) go through the same path."""
    X, sub = blobs([70, 12, 70, 12], d=10, seed=5)
    y = np.array([0] * 82 + [1] * 82)
    for method in ("gmm", "kmeans_silhouette"):
        groups, info = pseudo_groups(
            X, y, ClusteringSpec(method=method, scope="local", min_group_size=3, normalize=False), 0, what="features"
        )
        assert info["n_groups"] == 4 and adjusted_rand_score(sub, groups) == pytest.approx(1.0)
        assert all(len(np.unique(y[groups == g])) == 1 for g in np.unique(groups))


def test_bad_feature_rows_are_reported_as_features():
    X = np.random.default_rng(0).normal(size=(10, 4))
    X[3, 1] = np.inf
    with pytest.raises(DataError, match="rows of features contain NaN or inf"):
        pseudo_groups(X, np.array([0, 1] * 5), ClusteringSpec(method="gmm"), 0, what="features")


def three_separate_blobs(seed):
    """Blobs of 300, 300 and 60 points in 8-D, far apart: three connected components in the kNN graph."""
    rng = np.random.default_rng(seed)
    centres = np.zeros((3, 8))
    centres[1, 0] = centres[2, 1] = 30
    sizes = (300, 300, 60)
    X = np.concatenate([rng.normal(size=(n, 8)) + c for n, c in zip(sizes, centres)]).astype(np.float32)
    return X, np.repeat(np.arange(3), sizes)


@pytest.mark.parametrize("seed", [0, 1])
def test_spectral_split_separates_what_the_first_k_merged(seed):
    """k = 2 at the first level puts two of three blobs in one cluster; the split finds them by that
    cluster's own eigengap. A gap threshold above what Gaussian blobs show (about 0.1-0.2) stops the
    split inside a blob."""
    X, truth = three_separate_blobs(seed)
    plain, _ = cluster(X, ClusteringSpec(method="spectral", k=2), seed=0)
    assert adjusted_rand_score(truth, plain) < 0.9  # two blobs share a cluster
    labels, info = cluster(X, ClusteringSpec(method="spectral_split", k=2, split_gap=0.5), seed=0)
    assert info["k"] == 3 and adjusted_rand_score(truth, labels) == pytest.approx(1.0)
    assert [(s["depth"], s["k"]) for s in info["splits"]] == [(0, 2), (1, 2)]
    assert info["splits"][1]["n"] in (360, 600) and info["splits"][1]["gap"] >= 0.5  # the merged pair, split


def test_spectral_split_stops_by_depth_gap_and_size():
    X, _ = three_separate_blobs(0)
    plain, _ = cluster(X, ClusteringSpec(method="spectral", k=2), seed=0)
    for stop in ({"split_depth": 1}, {"split_gap": 2.0}, {"split_min_size": 400}):
        labels, info = cluster(X, ClusteringSpec(method="spectral_split", k=2, **stop), seed=0)
        np.testing.assert_array_equal(labels, plain)  # the first level only: spectral's own labels
        assert info["k"] == 2, stop
    # split_depth 1 is spectral itself, k = auto included
    auto, _ = cluster(X, ClusteringSpec(method="spectral"), seed=3)
    np.testing.assert_array_equal(cluster(X, ClusteringSpec(method="spectral_split", split_depth=1), seed=3)[0], auto)
