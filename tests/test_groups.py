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
    base = dict(
        y_val=y,
        clustering=ClusteringSpec(method="kmeans", k=2, scope="global", min_group_size=3),
        seed=0,
        val_features=F,
        val_logits=logits,
        heatmaps=H,
        true_groups=sub,
    )
    return GroupContext(**{**base, **over})


def test_registry_and_spec_key():
    assert from_dict({}).groups.source == "exmap"
    with pytest.raises(SpecError, match=r"groups.source': unknown group source 'oracle'. Registered: class, exmap"):
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
        infer_groups(
            "exmap", dataclasses.replace(c, clustering=dataclasses.replace(cspec, input="both"), val_features=None)
        )


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
    pieces = np.where(sub == 0, rng.integers(0, 3, len(y)), 0)  # class 0's majority in 3 pieces
    pieces = np.where(sub == 2, 10 + rng.integers(0, 2, len(y)), pieces)  # class 1's in 2
    fragments = np.where(sub == 1, 5, np.where(sub == 3, 20, pieces))  # the minorities whole
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


def two_shortcuts(seed=0, second=10.0, n=2000, d=64):
    """Features of 2 classes with a strong first shortcut (97% agree) and a weaker second one (90% agree
    within each (class, first) cell), on anisotropic noise whose largest directions are neither: the
    second shortcut sits on a quiet dimension, shifted by `second` (0: no second shortcut)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    a1 = np.where(rng.random(n) < 0.97, y, 1 - y)
    a2 = np.where(rng.random(n) < 0.9, y, 1 - y)
    X = rng.normal(size=(n, d)) * np.linspace(3, 0.5, d)
    X[:, 0] += 8 * y
    X[:, 1] += 6 * a1
    X[:, 40] += second * a2
    return y, a1, a2, X


def test_split_ica_finds_a_second_shortcut_inside_the_groups_and_splits_every_group_by_it():
    """groups.split_ica: given the (class, first shortcut) groups, the weaker second shortcut (a 10%
    minority in each large group, not the largest variance) is found as one attribute, and every group is
    split by it, the small ones too; fragments under min_size merge back."""
    from exmap_ray.groups.formation import split_by_components

    y, a1, a2, X = two_shortcuts()
    first = y * 2 + a1
    groups, info = split_by_components(first, X, seed=0, min_size=5)
    assert info["attributes"] == 1  # found in both large groups, kept once
    searched = {r["group"]: r for r in info["searched"]}
    assert set(searched) == {0, 3}  # the two groups of >= 100 members
    assert all(r["attribute"] == 0 and r["separation"] >= 3 and 0.03 <= r["share"] <= 0.25 for r in searched.values())
    assert adjusted_rand_score(y * 4 + a1 * 2 + a2, groups) > 0.95
    assert np.array_equal(np.unique(groups), np.arange(len(np.unique(groups))))  # dense ids
    assert np.bincount(groups).min() >= 5
    # every group is a part of one first-shortcut group (a split, never a merge across them)
    assert all(len(np.unique(first[groups == g])) == 1 for g in np.unique(groups))


def test_split_ica_leaves_groups_alone_when_no_component_has_two_clear_modes():
    from exmap_ray.groups.formation import split_by_components

    y, a1, _, X = two_shortcuts(second=0.0)
    first = y * 2 + a1
    groups, info = split_by_components(first, X, seed=0, min_size=5)
    assert info["attributes"] == 0 and info["merged"] == []
    assert np.array_equal(groups, first)


def test_split_ica_key_runs_after_the_source_never_on_the_oracle(monkeypatch):
    y, a1, a2, X = two_shortcuts()
    first = y * 2 + a1
    pairs = [(0, 0), (0, 1), (1, 0), (1, 1)]  # what exmap's clustering records: (class, cluster) per group id
    monkeypatch.setitem(
        GROUP_SOURCES._items, "first", GroupSource(lambda c: (first, {"group_class_cluster": pairs}), ())
    )
    c = GroupContext(
        y_val=y,
        clustering=ClusteringSpec(min_group_size=5),
        seed=0,
        val_features=X,
        true_groups=(y * 2 + a1) * 2 + a2,
        split_ica=True,
    )
    groups, info = infer_groups("first", c)
    assert info["n_groups_before_split"] == 4 and info["split_ica"]["attributes"] == 1 and info["n_groups"] > 4
    assert "group_class_cluster" not in info  # stale once split (run's figure captions read it)
    assert np.array_equal(infer_groups("first", dataclasses.replace(c, split_ica=False))[0], first)  # off: as is
    assert np.array_equal(infer_groups("true", c)[0], c.true_groups)
    with pytest.raises(UserError, match="split_ica needs ERM's val features"):
        infer_groups("first", dataclasses.replace(c, val_features=None))
    # the key reaches the context from a spec, and at its default it leaves the clusters stage's key alone
    from exmap_ray.stages import group_context

    on = from_dict({"groups": {"split_ica": True}})
    assert group_context(on, y, None, X, None, None).split_ica
    assert not group_context(from_dict({}), y, None, X, None, None).split_ica


def colour_and_place(seed=1):
    """2 classes x colour (which of 2 channels holds the relevance) x place (a faint spot top left or
    bottom right): 8 true groups, 120 / 20 / 20 / 8 per class. The channel decides most of the distance
    between two maps; the spot is a few pixels, present in both channels alike, under noise."""
    rng = np.random.default_rng(seed)
    sizes = [120, 20, 20, 8]
    y = np.repeat([0, 1], sum(sizes))
    colour = np.concatenate([np.repeat([c, c, 1 - c, 1 - c], sizes) for c in (0, 1)])
    place = np.concatenate([np.repeat([p, 1 - p, p, 1 - p], sizes) for p in (0, 1)])
    H = 0.2 * rng.normal(size=(len(y), 2, 8, 8))
    H[np.arange(len(y)), colour] += 1.0  # the colour: a whole channel
    spot = np.where(place == 0, 0, 6)
    for i in range(len(y)):
        H[i, :, spot[i] : spot[i] + 2, spot[i] : spot[i] + 2] += 0.3  # the place: 2 x 2 pixels, both channels
    true = y * 4 + colour * 2 + place
    return y, true, H


def test_cross_spatial_finds_the_place_the_channels_hide():
    """clustering.cross_spatial: the full maps cluster by channel and leave the spot's place inside
    each cluster; crossed with the clusters of the channel sums, every true group has pseudo groups of
    its own. Label-free: the true groups only score."""
    from exmap_ray.metrics import recovery

    y, true, H = colour_and_place()
    cspec = ClusteringSpec(method="spectral", scope="global", min_group_size=3)
    c = ctx(y_val=y, heatmaps=H, true_groups=true, val_features=None, val_logits=None, clustering=cspec)
    plain, info = infer_groups("exmap", c)
    assert info["scopes"]["global"]["k"] == 2 and "cross_scopes" not in info
    assert min(recovery(plain, true).values()) == 0.0  # the place is lost
    crossed, info = infer_groups(
        "exmap", c.__class__(**{**c.__dict__, "clustering": dataclasses.replace(cspec, cross_spatial="all")})
    )
    assert info["cross_scopes"]["global"]["k"] == 2
    assert min(recovery(crossed, true).values()) >= 0.95
    assert adjusted_rand_score(true, crossed) > 0.95
    # a point's pseudo group refines its plain one: crossing only splits
    assert all(len(np.unique(plain[crossed == g])) == 1 for g in np.unique(crossed))


def test_cross_spatial_refuses_what_it_cannot_sum():
    cspec = ClusteringSpec(method="kmeans", k=2, scope="global", min_group_size=3, cross_spatial="all")
    with pytest.raises(SpecError, match="spec key 'clustering.cross_spatial': 'all' splits clusters by the heatmaps'"):
        dataclasses.replace(cspec, input="features")  # refused with the spec, before ERM
    assert from_dict({"clustering": {"cross_spatial": "hard", "input": "both"}}).clustering.cross_spatial == "hard"
    # one channel (gradcam's maps): the channel sums are the maps, and the crossing changes nothing
    y, true, H = colour_and_place()
    one = ctx(
        y_val=y,
        heatmaps=H.sum(1, keepdims=True),
        true_groups=true,
        clustering=ClusteringSpec(method="spectral", scope="global", min_group_size=3),
    )
    plain, _ = infer_groups("exmap", one)
    crossed, _ = infer_groups(
        "exmap", dataclasses.replace(one, clustering=dataclasses.replace(one.clustering, cross_spatial="all"))
    )
    assert adjusted_rand_score(plain, crossed) == pytest.approx(1.0)
    flat = ctx().heatmaps.reshape(len(ctx().y_val), -1)
    with pytest.raises(
        UserError, match=r"needs heatmaps of shape \(N, channels, height, width\); these are \[\(32,\)\]"
    ):
        infer_groups("exmap", ctx(clustering=cspec, heatmaps=flat))


def test_cross_spatial_hard_keeps_apart_only_the_parts_erm_finds_harder():
    """cross_spatial: hard. Where ERM errs more on the rare place than on its (class, cluster), the place's
    parts stay apart as with `all`; where its errors follow the colour alone, every part is as easy as its
    (class, cluster), and the grouping is the plain one."""
    from exmap_ray.groups.formation import keep_hard_parts
    from exmap_ray.metrics import recovery

    y, true, H = colour_and_place()
    colour_minority, place_minority = (true % 4) >= 2, (true % 2) != y
    half = np.arange(len(y)) % 2 == 0

    def logits(wrong):
        out = np.zeros((len(y), 2))
        out[np.arange(len(y)), np.where(wrong, 1 - y, y)] = 1.0
        return out

    cspec = ClusteringSpec(method="spectral", scope="global", min_group_size=3)
    c = ctx(
        y_val=y, heatmaps=H, true_groups=true, val_features=None, clustering=cspec, val_logits=logits(colour_minority)
    )
    plain, _ = infer_groups("exmap", c)
    hard = dataclasses.replace(c, clustering=dataclasses.replace(cspec, cross_spatial="hard"))
    same, info = infer_groups("exmap", hard)  # errors follow the colour only
    assert adjusted_rand_score(plain, same) == pytest.approx(1.0) and info["cross_scopes"]["kept_apart"] == 0
    # ERM errs on the rare place too, and on half the rest of the rare colour
    harder = dataclasses.replace(hard, val_logits=logits(place_minority | (colour_minority & half)))
    split, info = infer_groups("exmap", harder)
    assert info["cross_scopes"]["kept_apart"] > 0 and min(recovery(split, true).values()) >= 0.9
    with pytest.raises(UserError, match="cross_spatial: hard needs ERM's val logits"):
        infer_groups("exmap", dataclasses.replace(hard, val_logits=None))
    # the rule itself: per (class, cluster), parts at least as accurate as the whole become one part (0)
    parts, kept = keep_hard_parts(
        np.zeros(6, int), np.zeros(6, int), np.array([0, 0, 1, 1, 2, 2]), np.array([1, 1, 1, 0, 1, 1], bool)
    )
    assert parts.tolist() == [0, 0, 2, 2, 0, 0] and kept == 1


def test_cross_spatial_on_shards_through_the_scalable_route(monkeypatch):
    """Millions of heatmaps come as memory-mapped shards and take the anchor-graph route: the channel
    sums are read shard by shard, and the crossing finds what the exact path finds."""
    from exmap_ray import clustering

    y, true, H = colour_and_place()
    cspec = ClusteringSpec(method="spectral", scope="global", min_group_size=3, cross_spatial="all")
    exact, _ = infer_groups("exmap", ctx(y_val=y, heatmaps=H, true_groups=true, clustering=cspec))
    monkeypatch.setattr(clustering.scale, "SCALE_MIN_N", 2)
    shards = [H[:150].astype(np.float32), H[150:].astype(np.float32)]
    scaled, info = infer_groups("exmap", ctx(y_val=y, heatmaps=shards, true_groups=true, clustering=cspec))
    assert info["cross_scopes"]["global"]["route"] == "anchor" and info["scopes"]["global"]["route"] == "anchor"
    assert adjusted_rand_score(exact, scaled) >= 0.95


def test_cross_features_splits_the_heatmap_clusters_by_the_feature_clusters():
    """clustering.cross_features: the heatmaps carry one shortcut (which channel), the features another
    (a direction of their own) that the heatmaps do not show; crossed, every true group gets pseudo groups
    of its own, and `hard` keeps apart only the parts ERM gets wrong more often. Label-free: true groups
    only score."""
    from exmap_ray.metrics import recovery

    rng = np.random.default_rng(3)
    y, true, H = colour_and_place()
    place = true % 2
    F = rng.normal(scale=0.2, size=(len(y), 16)) + np.outer(place * 2 - 1, np.eye(16)[0])  # place: features only
    H = H.copy()
    H[:, :, 6:8, 6:8] = H[:, :, 0:2, 0:2] = 0.0  # the heatmaps no longer show the place
    plain = ClusteringSpec(method="spectral", scope="global", min_group_size=3)
    groups, _ = infer_groups("exmap", ctx(y_val=y, heatmaps=H, val_features=F, true_groups=true, clustering=plain))
    assert min(recovery(groups, true).values()) < 0.5  # the heatmaps alone lose the place
    crossed = dataclasses.replace(plain, cross_features="all")
    groups, info = infer_groups("exmap", ctx(y_val=y, heatmaps=H, val_features=F, true_groups=true, clustering=crossed))
    assert min(recovery(groups, true).values()) >= 0.95 and "cross_scopes" in info
    # hard: ERM wrong exactly on the cells where both shortcuts disagree with the class (8 per class): in
    # each class's minority-colour cluster that place part stays apart; every easy part merges back
    colour = (true // 2) % 2
    wrong = (colour != y) & (place != y)
    logits = np.stack([y == 0, y == 1], 1).astype(float)
    logits[wrong] = logits[wrong][:, ::-1]
    hard = dataclasses.replace(plain, cross_features="hard")
    groups, _ = infer_groups(
        "exmap", ctx(y_val=y, heatmaps=H, val_features=F, val_logits=logits, true_groups=true, clustering=hard)
    )
    assert len(np.unique(groups)) == 6  # per class: the majority colour whole, the other colour in two
    assert all(recovery(groups, true)[g] >= 0.95 for g in np.unique(true[wrong]))
    with pytest.raises(SpecError, match="one crossing at a time"):
        dataclasses.replace(plain, cross_features="all", cross_spatial="all")
