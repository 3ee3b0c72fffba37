"""Group sources for val: ExMap, GEORGE-style features, JTT error set, random floor, oracle."""
import dataclasses

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from exmap_ray.errors import SpecError, UserError
from exmap_ray.groups import GROUP_SOURCES, GroupContext, GroupSource, infer_groups
from exmap_ray.spec import ClusteringSpec, from_dict


def toy(seed=0):
    """2 classes x 2 subgroups (60 + 15 each). Heatmaps separate subgroups by a 'colour' channel;
    features separate them along other directions, so the two inputs are distinguishable."""
    rng = np.random.default_rng(seed)
    sizes = [60, 15, 60, 15]
    sub = np.repeat(np.arange(4), sizes)
    y = sub // 2
    colour = sub % 2
    H = 0.05 * rng.normal(size=(len(y), 2, 4, 4))
    H[colour == 0, 0] += 1.0
    H[colour == 1, 1] += 1.0
    centers = rng.normal(size=(4, 8)) * 4
    F = centers[sub] + 0.2 * rng.normal(size=(len(y), 8))
    logits = np.zeros((len(y), 2))
    logits[np.arange(len(y)), np.where(colour == 0, y, 1 - y)] = 1.0  # the ERM follows the colour
    return y, sub, H, F, logits


def ctx(**over):
    y, sub, H, F, logits = toy()
    base = dict(y_val=y, clustering=ClusteringSpec(method="kmeans", k=2, scope="global", min_group_size=3),
                seed=0, val_features=F, val_logits=logits, heatmaps=H, true_groups=sub)
    return GroupContext(**{**base, **over})


def test_registry_and_spec_key():
    assert from_dict({}).groups.source == "exmap"
    with pytest.raises(SpecError, match=r"groups.source': unknown group source 'oracle'. Registered: exmap"):
        from_dict({"groups": {"source": "oracle"}})


def test_exmap_clusters_heatmaps_into_class_by_cluster():
    c = ctx()
    groups, info = infer_groups("exmap", c)
    assert groups.dtype == np.int64 and info["source"] == "exmap" and info["n_groups"] == 4
    assert adjusted_rand_score(c.true_groups, groups) == pytest.approx(1.0)
    assert all(len(np.unique(c.y_val[groups == g])) == 1 for g in np.unique(groups))


def test_clustering_input_switches_exmap_to_features():
    """clustering.input: features clusters the features with the very same clusterer; heatmaps not needed."""
    cspec = ClusteringSpec(method="kmeans", k=2, scope="local", input="features", min_group_size=3)
    c = ctx(clustering=cspec, heatmaps=None)
    groups, info = infer_groups("exmap", c)
    assert adjusted_rand_score(c.true_groups, groups) == pytest.approx(1.0)
    with pytest.raises(UserError, match="group source 'exmap' needs heatmaps"):
        infer_groups("exmap", ctx(heatmaps=None))


def test_clustering_input_both_finds_what_each_input_alone_misses():
    """clustering.input: both. Two shortcuts: the heatmaps show one (colour), the features the other
    (position), on a scale 1000 times larger. Each input alone cannot tell all four subgroups of a class
    apart; side by side, each block scaled by its own max |value|, the same clusterer recovers them all."""
    rng = np.random.default_rng(0)
    sub = np.repeat(np.arange(8), [40, 12, 12, 40] * 2)  # class x colour x position
    y, colour, position = sub // 4, (sub // 2) % 2, sub % 2
    H = 0.05 * rng.normal(size=(len(y), 2, 3, 3))
    H[np.arange(len(y)), colour] += 1.0
    F = 1000 * (np.eye(6)[position + 2 * y] + 0.05 * rng.normal(size=(len(y), 6)))
    cspec = ClusteringSpec(method="kmeans", k=4, scope="local", min_group_size=3)
    c = GroupContext(y_val=y, clustering=cspec, seed=0, val_features=F, heatmaps=H)
    ari = {}
    for what in ("heatmaps", "features", "both"):
        groups, info = infer_groups("exmap", dataclasses.replace(c, clustering=dataclasses.replace(cspec, input=what)))
        ari[what] = adjusted_rand_score(sub, groups)
    assert ari["both"] == pytest.approx(1.0) and max(ari["heatmaps"], ari["features"]) < 0.9, ari
    with pytest.raises(UserError, match="group source 'exmap' needs val_features"):
        infer_groups("exmap", dataclasses.replace(c, clustering=dataclasses.replace(cspec, input="both"),
                                                  val_features=None))


def test_features_source_clusters_each_class_apart():
    c = ctx()  # the clustering spec says global: the GEORGE-style source is per class regardless
    groups, info = infer_groups("features", c)
    assert set(info["scopes"]) == {"class 0", "class 1"} and info["n_groups"] == 4
    assert adjusted_rand_score(c.true_groups, groups) == pytest.approx(1.0)


def test_jtt_error_set_is_2y_plus_wrong():
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    logits = np.array([[2, 0], [2, 0], [0, 2], [0, 2], [0, 1], [0, 1], [0, 1], [1, 0], [1, 0], [1, 0]], float)
    c = GroupContext(y_val=y, clustering=ClusteringSpec(min_group_size=2), seed=0, val_logits=logits)
    groups, info = infer_groups("jtt_error_set", c)
    assert groups.tolist() == [0, 0, 1, 1, 2, 2, 2, 3, 3, 3]
    assert info["error_rate"] == pytest.approx(0.5) and info["sizes"] == {0: 2, 1: 2, 2: 3, 3: 3}
    # an error set below clustering.min_group_size folds back into its class's correct group
    c3 = GroupContext(y_val=y, clustering=ClusteringSpec(min_group_size=3), seed=0, val_logits=logits)
    groups3, info3 = infer_groups("jtt_error_set", c3)
    assert groups3.tolist() == [0, 0, 0, 0, 2, 2, 2, 3, 3, 3] and info3["merged"] == [{"class": 0, "errors": 2}]


def test_random_groups_are_balanced_per_class_and_seeded():
    c = ctx(random_k=3)
    groups, info = infer_groups("random", c)
    assert info["n_groups"] == 6 and info["k_per_class"] == 3
    for cls in (0, 1):
        sizes = np.bincount(groups[c.y_val == cls])
        sizes = sizes[sizes > 0]
        assert len(sizes) == 3 and sizes.max() - sizes.min() <= 1
    assert all(len(np.unique(c.y_val[groups == g])) == 1 for g in np.unique(groups))
    assert np.array_equal(groups, infer_groups("random", c)[0])
    assert not np.array_equal(groups, infer_groups("random", ctx(random_k=3, seed=1))[0])
    assert infer_groups("random", ctx())[1]["k_per_class"] == 2  # clustering.k = 2 when random_k is unset
    assert adjusted_rand_score(c.true_groups, groups) < 0.5  # no information beyond the class


def test_only_the_oracle_sees_the_true_groups(monkeypatch):
    seen = {}

    def spy(c):
        seen["true"] = c.true_groups
        return np.zeros(len(c.y_val), np.int64), {}

    monkeypatch.setitem(GROUP_SOURCES._items, "spy", GroupSource(spy, ()))
    c = ctx()
    infer_groups("spy", c)
    assert seen["true"] is None
    groups, info = infer_groups("true", c)
    assert np.array_equal(groups, c.true_groups) and info["n_groups"] == 4
    with pytest.raises(UserError, match="needs true_groups"):
        infer_groups("true", ctx(true_groups=None))
    # and no non-oracle source changes its answer when the truth is (or is not) in the context
    for name in ("exmap", "features", "jtt_error_set", "random"):
        assert np.array_equal(infer_groups(name, c)[0], infer_groups(name, ctx(true_groups=None))[0])


def test_merge_easy_joins_the_groups_erm_gets_right_and_keeps_the_hard_ones(monkeypatch):
    """groups.merge_easy: the toy ERM follows the colour, so each class's majority is right and its
    minority wrong (class accuracy 0.8). A source that cuts each majority into pieces (3 and 2) gets
    them joined again; the minorities stay apart, and the oracle's groups are never touched."""
    from exmap_ray.groups import merge_easy_groups

    y, sub, _, _, logits = toy()
    rng = np.random.default_rng(0)
    pieces = np.where(sub == 0, rng.integers(0, 3, len(y)), 0)          # class 0's majority in 3 pieces
    pieces = np.where(sub == 2, 10 + rng.integers(0, 2, len(y)), pieces)  # class 1's in 2
    fragments = np.where(sub == 1, 5, np.where(sub == 3, 20, pieces))    # the minorities whole
    merged, info = merge_easy_groups(fragments, y, logits)
    assert np.array_equal(merged, sub)  # dense ids, in the old ids' order
    assert info == {0: [0, 1, 2], 1: [10, 11]}
    monkeypatch.setitem(GROUP_SOURCES._items, "pieces", GroupSource(lambda c: (fragments, {}), ()))
    groups, info = infer_groups("pieces", ctx(merge_easy=True))
    assert np.array_equal(groups, sub) and info["n_groups"] == 4 and info["n_groups_before_merge"] == 7
    assert infer_groups("pieces", ctx())[1]["n_groups"] == 7  # off by default
    assert np.array_equal(infer_groups("true", ctx(merge_easy=True))[0], sub)
    with pytest.raises(UserError, match="merge_easy needs ERM's val logits"):
        infer_groups("pieces", ctx(merge_easy=True, val_logits=None))
