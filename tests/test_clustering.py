import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from exmap_ray.clustering import eigengap_k, kmeans, knn_affinity, laplacian_spectrum, normalize_rows
from exmap_ray.groups.formation import merge_small, pseudo_groups
from exmap_ray.errors import UserError
from exmap_ray.spec import ClusteringSpec


def blobs(sizes, d=16, spread=0.05, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(len(sizes), d)) * 3
    X = np.concatenate([c + spread * rng.normal(size=(n, d)) for c, n in zip(centers, sizes)])
    return X.astype(np.float32), np.repeat(np.arange(len(sizes)), sizes)


def test_kmeans_trains_on_all_points():
    # 3 far blobs, one tiny: FAISS's default 256*k sample could miss it; we train on everything
    X, truth = blobs([3000, 3000, 12], seed=1)
    labels = kmeans(X, 3, niter=25, nredo=3, seed=0)
    assert adjusted_rand_score(truth, labels) == pytest.approx(1.0)


@pytest.mark.parametrize("k", [2, 3, 5])
def test_eigengap_picks_planted_k(k):
    X, truth = blobs([120] * k, seed=k)
    eig, _ = laplacian_spectrum(knn_affinity(X))
    assert eig[0] == pytest.approx(0.0, abs=1e-6) and np.all(np.diff(eig) >= -1e-9)
    assert eigengap_k(eig, 10) == k
    labels, info = pseudo_groups(
        X, np.zeros(len(X), int), ClusteringSpec(method="spectral", k="auto", scope="global"), seed=0
    )
    assert info["scopes"]["global"]["k"] == k and adjusted_rand_score(truth, labels) == pytest.approx(1.0)


def test_spectral_sparse_path_matches_planted_k():
    X, truth = blobs([1000, 1000, 800], seed=3)  # N above DENSE_EIG_MAX: the eigsh path
    eig, _ = laplacian_spectrum(knn_affinity(X))
    assert eigengap_k(eig, 10) == 3


def test_local_and_global_pseudo_groups_are_class_by_cluster():
    X, truth = blobs([60, 20, 60, 20], seed=4)
    y = np.array([0] * 80 + [1] * 80)
    for scope in ("local", "global"):
        cs = ClusteringSpec(method="kmeans", k=2, scope=scope, min_group_size=1)
        groups, info = pseudo_groups(X, y, cs, seed=0)
        assert info["n_groups"] == 4 and adjusted_rand_score(truth, groups) == pytest.approx(1.0)
        for g in np.unique(groups):  # no pseudo group mixes classes
            assert len(np.unique(y[groups == g])) == 1


def test_small_fragments_merge_into_nearest_same_class_group():
    X = np.array([[0.0], [0.1], [0.2], [5.0], [5.1], [5.2], [5.3], [5.4], [4.9]], np.float32)
    y = np.zeros(9, int)
    clusters = np.array([0, 0, 0, 1, 1, 1, 1, 1, 2])  # cluster 2 is a 1-point fragment near cluster 1
    merged, log = merge_small(X, y, clusters, min_size=3)
    assert merged.tolist() == [0, 0, 0, 1, 1, 1, 1, 1, 1]
    assert log == [{"class": 0, "cluster": 2, "size": 1, "into": 1}]


def test_normalization_divides_by_max_abs():
    H = np.array([[[-4.0, 2.0]], [[0.0, 0.0]]])
    np.testing.assert_allclose(normalize_rows(H), [[-1.0, 0.5], [0.0, 0.0]])


def test_bad_heatmaps_and_k_are_reported():
    y = np.array([0, 0, 0, 1, 1, 1])
    with pytest.raises(UserError, match="NaN"):
        pseudo_groups(np.full((6, 4), np.nan), y, ClusteringSpec(), 0)
    with pytest.raises(UserError, match="all zero"):
        pseudo_groups(np.zeros((6, 4)), y, ClusteringSpec(), 0)
    with pytest.raises(UserError, match="spec key 'clustering.k': 5 clusters but a scope has only 3 val points"):
        pseudo_groups(np.random.rand(6, 4), y, ClusteringSpec(method="kmeans", k=5, scope="local"), 0)
