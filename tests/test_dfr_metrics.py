import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from exmap_ray.errors import UserError
from exmap_ray.metrics import agreement, evaluate, recovery
from exmap_ray.retrain.dfr import balance_size, balanced_subsample, fit_dfr, group_weights
from exmap_ray.retrain import DfrKeys, RetrainConfig


def shortcut_features(n, rho, seed):
    """Feature 0 = core (noisy y), feature 1 = spurious (clean s); s agrees with y w.p. rho."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    s = np.where(rng.random(n) < rho, y, 1 - y)
    core = (2 * y - 1) + 0.8 * rng.normal(size=n)
    spur = 3 * (2 * s - 1) + 0.1 * rng.normal(size=n)
    noise = rng.normal(size=(n, 6))
    return np.column_stack([core, spur, noise]), y, 2 * y + s


def test_dfr_with_groups_beats_plain_logistic_regression_on_the_worst_group():
    Xv, yv, gv = shortcut_features(2000, 0.95, 0)
    Xt, yt, gt = shortcut_features(4000, 0.5, 1)
    names = ["0/0", "0/1", "1/0", "1/1"]
    plain = LogisticRegression().fit(Xv, yv).predict(Xt)
    model = fit_dfr(Xv, yv, gv, RetrainConfig(DfrKeys(n_final_fits=10), n_select_repeats=3), seed=0)
    wga_plain = evaluate(plain, yt, gt, names, gv)["worst_group_acc"]
    wga_dfr = evaluate(model.predict(Xt), yt, gt, names, gv)["worst_group_acc"]
    assert wga_dfr > wga_plain + 0.3 and wga_dfr > 0.75
    assert model.C in DfrKeys().c_grid and set(model.selection) == set(DfrKeys().c_grid)


def test_balanced_subsample_equalises_groups():
    g = np.array([0] * 50 + [1] * 5 + [2] * 9)
    idx = balanced_subsample(g, np.random.default_rng(0))
    assert np.bincount(g[idx]).tolist() == [5, 5, 5] and len(set(idx)) == 15


def test_default_balancing_draws_what_plain_dfr_draws():
    """whole_group_max 0 (the default) is the DFR paper's balancing, draw for draw: every group is cut
    down to the smallest, by the same rng calls in the same order, so existing results stay identical."""
    g = np.random.default_rng(3).integers(0, 5, 400)
    for seed in range(5):
        rng_a, rng_b = np.random.default_rng(seed), np.random.default_rng(seed)
        m = np.bincount(g).min()
        plain = np.concatenate([rng_b.choice(np.flatnonzero(g == k), m, replace=False) for k in np.unique(g)])
        assert np.array_equal(balanced_subsample(g, rng_a), plain)
        assert np.array_equal(balanced_subsample(g, rng_a, whole_max=0), balanced_subsample(g, rng_b, 0))


def test_whole_group_max_keeps_small_groups_whole_and_balances_to_the_smallest_above():
    """The released ExMap's DFR (whole_group_max 5): a group of 4 (and one of 5) enters every balanced
    fit whole; every other group is cut down to the smallest group above 5 (here 9)."""
    g = np.array([0] * 50 + [1] * 4 + [2] * 9 + [3] * 30 + [4] * 5)
    assert balance_size(np.bincount(g), 5) == 9 and balance_size(np.bincount(g), 0) == 4
    rng = np.random.default_rng(0)
    for _ in range(20):
        idx = balanced_subsample(g, rng, whole_max=5)
        assert np.bincount(g[idx]).tolist() == [9, 4, 9, 9, 5] and len(set(idx)) == len(idx)
        assert set(np.flatnonzero(g == 1)) <= set(idx) and set(np.flatnonzero(g == 4)) <= set(idx)
    # every group at or below the threshold: all enter whole, nothing is cut down
    small = np.array([0] * 3 + [1] * 5)
    assert balance_size(np.bincount(small), 5) is None
    assert sorted(balanced_subsample(small, rng, whole_max=5)) == list(range(8))


def test_dfr_fits_with_a_tiny_group_when_it_enters_whole():
    """A 1-member group is refused by plain DFR balancing (it would cut every group to 1); with
    dfr.whole_group_max it enters whole and DFR fits, and the refusal names the option."""
    Xv, yv, gv = shortcut_features(600, 0.9, 0)
    lone = np.flatnonzero(gv == 1)[0]
    gv = gv.copy()
    gv[gv == 1] = 0  # class 0's minority folds into its majority ...
    gv[lone] = 1  # ... but for one point, which stays a group of 1
    with pytest.raises(UserError, match=r"group 1 has 1 val member\(s\).*dfr.whole_group_max"):
        fit_dfr(Xv, yv, gv, RetrainConfig(DfrKeys(c_grid=[1.0], n_final_fits=2), n_select_repeats=2), seed=0)
    model = fit_dfr(
        Xv,
        yv,
        gv,
        RetrainConfig(DfrKeys(c_grid=[1.0, 0.1], n_final_fits=3, whole_group_max=5), n_select_repeats=2),
        seed=0,
    )
    assert model.predict(Xv).shape == yv.shape and model.C in (1.0, 0.1)


def test_group_weights_give_every_group_the_same_total():
    g = np.array([4] * 50 + [0] * 3 + [9] * 17)
    w = group_weights(g)
    assert w.mean() == pytest.approx(1.0)
    totals = [w[g == k].sum() for k in (0, 4, 9)]
    assert np.allclose(totals, totals[0]) and w[g == 0].min() > w[g == 4].max()


def test_reweight_fits_every_point_weighted_by_its_group():
    """retrain.dfr.balance reweight: the final model is one fit on all of val, each point weighted by
    1 / its group's size, at the C chosen on the held-out halves (sklearn's weighted fit, up to the
    solver's tolerance: its random_state only orders liblinear's coordinate steps); it
    takes a 1-member group (nothing is cut down to it) and refuses whole_group_max, which it ignores."""
    Xv, yv, gv = shortcut_features(800, 0.9, 0)
    gv = gv.copy()
    gv[np.flatnonzero(gv == 1)[0]] = 7  # a group of 1 (class 0), refused by subsampling
    cfg = RetrainConfig(DfrKeys(c_grid=[1.0, 0.1], balance="reweight"), n_select_repeats=3)
    model = fit_dfr(Xv, yv, gv, cfg, seed=0)
    X = (Xv - model.mean) / model.std
    ref = LogisticRegression(penalty="l1", C=model.C, solver="liblinear", random_state=0)
    ref.fit(X, yv, sample_weight=group_weights(gv))
    assert np.allclose(model.coef, ref.coef_, atol=1e-3) and np.allclose(model.intercept, ref.intercept_, atol=1e-3)
    assert not np.allclose(
        model.coef, LogisticRegression(penalty="l1", C=model.C, solver="liblinear").fit(X, yv).coef_, atol=1e-2
    )
    assert model.heldout_idx.shape == (3, 400)  # the same held-out halves as subsampling's
    with pytest.raises(UserError, match=r"group 7 has 1 val member"):
        fit_dfr(Xv, yv, gv, RetrainConfig(DfrKeys(c_grid=[1.0]), n_select_repeats=2), seed=0)
    with pytest.raises(UserError, match=r"whole_group_max \(5\) applies to retrain.dfr.balance: subsample only"):
        fit_dfr(Xv, yv, gv, RetrainConfig(DfrKeys(balance="reweight", whole_group_max=5)), seed=0)


def test_dfr_rejects_bad_groups():
    X = np.random.rand(20, 3)
    with pytest.raises(UserError, match="at least two classes"):
        fit_dfr(X, np.zeros(20, int), np.zeros(20, int), RetrainConfig(DfrKeys()), 0)
    y = np.array([0, 1] * 10)
    with pytest.raises(UserError, match="mixes classes"):
        fit_dfr(X, y, np.zeros(20, int), RetrainConfig(DfrKeys()), 0)


def test_evaluate_reports_both_means_and_worst_group():
    y = np.array([0, 0, 0, 1, 1, 1])
    g = np.array([0, 0, 1, 2, 2, 3])
    pred = np.array([0, 0, 1, 1, 1, 1])
    r = evaluate(pred, y, g, ["a", "b", "c", "d"], train_group=np.array([0, 0, 0, 1, 2, 2, 2, 3]))
    assert r["per_group"] == {"a": 1.0, "b": 0.0, "c": 1.0, "d": 1.0}
    assert r["worst_group_acc"] == 0.0 and r["mean_acc"] == pytest.approx(5 / 6)
    assert r["mean_acc_train_weighted"] == pytest.approx((3 * 1 + 1 * 0 + 3 * 1 + 1 * 1) / 8)


def test_recovery_sees_a_minority_that_ari_hides():
    true = np.array([0] * 95 + [1] * 5)
    merged = np.zeros(100, int)  # minority lost inside the majority's cluster
    found = np.array([0] * 95 + [1] * 5)
    assert recovery(merged, true) == {0: 1.0, 1: 0.0}
    assert recovery(found, true) == {0: 1.0, 1: 1.0}
    a = agreement(found, true, ["maj", "min"])
    assert a["ari"] == pytest.approx(1.0) and a["worst_recovery"] == 1.0


def test_worst_over_groupings_penalises_a_missed_minority():
    from exmap_ray.selection import worst_over_groupings

    y = np.array([0] * 40 + [1] * 40)
    minority = np.zeros(80, bool)
    minority[[0, 1, 2, 3, 4, 5, 40, 41, 42, 43, 44, 45]] = True
    found = np.where(minority, 2 + y, y)  # a grouping that isolates the minorities
    missed = y.copy()  # a grouping that does not (groups = classes)
    idx = np.arange(80)[None, :]
    shortcut_pred = np.where(minority, 1 - y, y)[None, :]  # right on majorities, wrong on minorities
    robust_pred = y[None, :]  # right everywhere
    # judged only on its own (missed) groups the shortcut model looks fine ...
    assert worst_over_groupings(idx, shortcut_pred, y, [missed]) == pytest.approx(0.85)
    # ... but not once another trial's grouping that found the minority is included
    assert worst_over_groupings(idx, shortcut_pred, y, [missed, found]) == 0.0
    assert worst_over_groupings(idx, robust_pred, y, [missed, found]) == 1.0


def test_dfr_handles_more_than_two_classes():
    from exmap_ray.retrain import RETRAINERS, fit_dfr
    from exmap_ray.spec import from_dict

    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 60)
    X = rng.normal(size=(180, 5)) + np.eye(5)[y] * 3
    groups = y * 2 + (rng.random(180) < 0.3)
    spec = from_dict({"retrain": {"n_select_repeats": 2, "dfr": {"c_grid": [1.0], "n_final_fits": 2}}})
    model = fit_dfr(X, y, groups, RETRAINERS.get("dfr").config(spec), 0)
    assert (model.predict(X) == y).mean() > 0.9


def test_score_se_binomial_rests_on_the_worst_groups_size():
    from exmap_ray.selection import score_se, worst_over_groupings_halves

    y = np.array([0] * 20 + [1] * 20)
    g = np.array([0] * 16 + [1] * 4 + [2] * 16 + [3] * 4)  # class 0: groups 0 (16) and 1 (4); class 1: 2, 3
    pred = y.copy()
    pred[16:19] = 1  # three of group 1's four wrong
    idx = np.array([np.arange(40), np.arange(40)])  # two "halves" that both hold everything
    score, halves, sizes = worst_over_groupings_halves(idx, np.array([pred, pred]), y, [g])
    assert score == pytest.approx(0.25) and list(halves) == [0.25, 0.25] and list(sizes) == [4, 4]
    assert score_se(score, halves, sizes, "binomial") == pytest.approx(np.sqrt(0.25 * 0.75 / 4))
    assert score_se(score, halves, sizes, "halves") == 0.0  # identical halves: no spread, the blind spot
    assert np.isnan(score_se(score, halves[:1], sizes[:1], "halves"))
    with pytest.raises(ValueError, match="binomial"):
        score_se(score, halves, sizes, "bootstrap")


def test_pooled_worst_group_pools_each_group_over_the_halves_before_the_minimum():
    from exmap_ray.selection import pooled_worst_over_groupings, score_se, worst_over_groupings_halves

    y = np.zeros(12, np.int64)
    g = np.array([0] * 6 + [1] * 3 + [2] * 3)  # one group of six, two of three
    right = np.ones(12, bool)
    right[[6, 11]] = False  # group 1 loses member 6, group 2 member 11: each 2/3 right over all of val
    pred = np.where(right, y, 1)
    # two halves: the first holds the wrong member of group 1, the second the wrong member of group 2
    idx = np.array([[0, 1, 2, 6, 7, 9, 10], [3, 4, 5, 8, 11, 6, 7]])
    halves_pred = pred[idx]
    per_half, _, _ = worst_over_groupings_halves(idx, halves_pred, y, [g], min_members=1)
    score, halves, sizes = pooled_worst_over_groupings(idx, halves_pred, y, [g], min_members=1)
    # per half: the first half's worst is group 1 (1 of 2), the second's group 2 (0 of 1): (1/2 + 0) / 2
    assert per_half == pytest.approx(0.25)
    # pooled: group 1 has 3 of its 5 held-out predictions right, group 2 2 of 3, group 0 all: the worst is 0.6
    assert score == pytest.approx(0.6) and list(sizes) == [3, 3]
    assert list(halves) == pytest.approx([1 / 2, 2 / 3])  # group 1 on each half
    assert score_se(score, halves, sizes, "binomial") == pytest.approx(np.sqrt(0.6 * 0.4 / 3))
    # groups with fewer val members than min_members leave the score
    assert pooled_worst_over_groupings(idx, halves_pred, y, [g], min_members=4)[0] == 1.0
    # a grouping that isolates a missed minority still sets it, as with the per-half score (the single
    # group of all twelve: 11 of 14 predictions right)
    assert pooled_worst_over_groupings(idx, halves_pred, y, [np.zeros(12), g], min_members=1)[0] == pytest.approx(0.6)
    assert pooled_worst_over_groupings(idx, halves_pred, y, [np.zeros(12)], min_members=1)[0] == pytest.approx(11 / 14)


def test_search_min_members_keeps_a_few_images_from_deciding_the_pick():
    """groups.pick_among scores every candidate on every candidate's groups; search.min_members leaves out
    the groups with fewer val members, so one tiny group cannot decide the choice."""
    from types import SimpleNamespace

    from exmap_ray.errors import SpecError
    from exmap_ray.selection import pick_among
    from exmap_ray.spec import from_dict

    from .conftest import tiny_spec_dict

    y = np.array([0] * 30 + [1] * 30)
    g_a = y.copy()  # candidate A's groups: the classes
    g_b = np.where(np.arange(60) < 4, 2, y)  # B's: the classes, with 4 images of class 0 apart
    pred_a = y.copy()
    pred_a[:4] = 1  # A misses the 4 images and nothing else
    pred_b = y.copy()
    pred_b[30:36] = 0  # B gets them right and misses 6 of class 1 (0.8 there)
    idx = [np.arange(60)]

    def cand(pred, g):
        model = SimpleNamespace(heldout_idx=idx, heldout_pred=[pred], heldout={"pseudo": 0.0, "class": 0.0})
        return SimpleNamespace(model=model, group_info={"n_groups": len(np.unique(g))}), g

    cands = [cand(pred_a, g_a), cand(pred_b, g_b)]
    metric = "sweep_pooled_worst_group_acc"
    chosen, scored = pick_among(cands, y, metric, "best", "binomial", min_members=3)
    assert chosen == 1 and scored[0]["selection_metric"] == 0.0  # the 4 images decide: A scores 0 there
    chosen, scored = pick_among(cands, y, metric, "best", "binomial", min_members=5)
    assert chosen == 0 and scored[0]["selection_metric"] == pytest.approx(26 / 30)  # class 0 as a whole
    assert scored[1]["selection_metric"] == pytest.approx(0.8)
    # the key: 3 unless a spec sets it; it must be a positive integer
    assert from_dict(tiny_spec_dict()).search.min_members == 3
    assert from_dict(tiny_spec_dict(search={"min_members": 12})).search.min_members == 12
    with pytest.raises(SpecError, match="search.min_members"):
        from_dict(tiny_spec_dict(search={"min_members": 0}))
