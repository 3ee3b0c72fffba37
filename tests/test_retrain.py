"""Retrainers from any group labels: GroupDRO and JTT on the last layer, end-to-end GroupDRO/JTT on a real timm net."""

import numpy as np
import pytest
import timm
import torch
from sklearn.linear_model import LogisticRegression

from exmap_ray.errors import SpecError
from exmap_ray.groups import GroupContext, infer_groups
from exmap_ray.metrics import evaluate
from exmap_ray.retrain import RETRAINERS, Head, LastLayerResult, RetrainedModel, Retrainer, error_set_from_groups
from exmap_ray.retrain.groupdro import groupdro_step
from exmap_ray.spec import ClusteringSpec, from_dict

NAMES = ["y0/s0", "y0/s1", "y1/s0", "y1/s1"]


def shortcut(n, rho, seed):
    """x0 = core feature (noisy y), x1 = spurious (clean s), s agrees with y w.p. rho; group = 2 y + s."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    s = np.where(rng.random(n) < rho, y, 1 - y)
    X = np.column_stack(
        [(2 * y - 1) + 0.8 * rng.normal(size=n), 3 * (2 * s - 1) + 0.1 * rng.normal(size=n), rng.normal(size=(n, 6))]
    )
    return X, y, 2 * y + s


def small_spec(**retrain):
    return from_dict({"retrain": {"n_select_repeats": 3, **retrain}})


def fit(method, X, y, groups, spec, **kw):
    """A retrainer fitted with the spec section it reads (`Retrainer.config`)."""
    r = RETRAINERS.get(method)
    return r.fit(X, y, groups, r.config(spec), **kw)


@pytest.fixture(scope="module")
def problem():
    Xv, yv, gv = shortcut(1200, 0.95, 0)
    Xt, yt, gt = shortcut(4000, 0.5, 1)
    plain = LogisticRegression().fit(Xv, yv).predict(Xt)
    return Xv, yv, gv, Xt, yt, gt, evaluate(plain, yt, gt, NAMES, gv)["worst_group_acc"]


@pytest.mark.parametrize("method", ["groupdro", "jtt"])
def test_true_groups_beat_plain_erm_on_the_worst_group(problem, method):
    Xv, yv, gv, Xt, yt, gt, wga_plain = problem
    model = fit(method, Xv, yv, gv, small_spec(), seed=0)
    wga = evaluate(model.predict(Xt), yt, gt, NAMES, gv)["worst_group_acc"]
    assert wga_plain < 0.55 and wga > wga_plain + 0.25 and wga > 0.75
    assert model.chosen["weight_decay"] in getattr(small_spec().retrain, method).weight_decay_grid
    assert set(model.heldout) >= {"pseudo", "class"} and model.heldout_pred.shape == model.heldout_idx.shape


def test_jtt_from_erm_errors_beats_erm(problem):
    """The paper's JTT: the error set is where the ERM model is wrong (here on val), upweighted."""
    Xv, yv, gv, Xt, yt, gt, wga_plain = problem
    erm = LogisticRegression().fit(Xv, yv)
    ctx = GroupContext(
        y_val=yv,
        clustering=ClusteringSpec(),
        seed=0,
        val_logits=erm.decision_function(Xv)[:, None] * np.array([[-1.0, 1.0]]),
    )
    groups, info = infer_groups("jtt_error_set", ctx)
    assert 0 < info["error_rate"] < 0.2
    assert np.array_equal(error_set_from_groups(yv, groups), erm.predict(Xv) != yv)
    model = fit("jtt", Xv, yv, groups, small_spec(jtt={"upweight": 20.0}), seed=0)
    wga = evaluate(model.predict(Xt), yt, gt, NAMES, gv)["worst_group_acc"]
    assert wga > wga_plain + 0.15


def test_selection_is_label_free_and_shares_dfrs_halves(problem):
    Xv, yv, gv, *_ = problem
    spec = from_dict({"retrain": {"n_select_repeats": 3, "dfr": {"n_final_fits": 2}}})
    noise = np.random.default_rng(5).integers(0, 4, len(yv))
    a = fit("groupdro", Xv, yv, gv, spec, seed=3)
    b = fit("groupdro", Xv, yv, gv, spec, seed=3, score_groups={"true": noise})
    assert a.chosen == b.chosen and np.array_equal(a.coef, b.coef) and "true" in b.heldout
    dfr = fit("dfr", Xv, yv, gv, spec, seed=3)
    assert np.array_equal(dfr.heldout_idx, a.heldout_idx) and dfr.chosen == {"C": dfr.C}


@pytest.mark.parametrize("method", RETRAINERS.names())
def test_every_retrainer_keeps_the_typed_contract(problem, method):
    """Each registered retrainer is a `Retrainer` owning one spec section, retrain.<name>, handed to it with
    the shared keys; its head, with the features
    of each split, is a `RetrainedModel` that predicts every point of that split."""
    Xv, yv, gv, Xt, *_ = problem
    r = RETRAINERS.get(method)
    spec = from_dict({"retrain": {"n_select_repeats": 2, "dfr": {"n_final_fits": 2}}})
    cfg = r.config(spec)
    assert isinstance(r, Retrainer) and r.section == f"retrain.{method}" and cfg.own is getattr(spec.retrain, method)
    assert cfg.n_select_repeats == 2 and cfg.end_to_end is spec.retrain.end_to_end
    head = r.fit(Xv, yv, gv, r.config(spec), seed=0)
    assert isinstance(head, Head)
    model = LastLayerResult(head, {"val": Xv, "test": Xt})
    assert isinstance(model, RetrainedModel)
    assert model.predictions("val").shape == yv.shape and model.predictions("test").shape == (len(Xt),)
    assert np.array_equal(model.predictions("test"), head.predict(Xt)) and model.chosen == head.chosen


def test_groupdro_step_moves_weight_to_the_worst_group_and_has_the_right_gradient():
    rng = np.random.default_rng(0)
    X, yi, gi = rng.normal(size=(12, 3)), rng.integers(0, 2, 12), np.repeat([0, 1, 2], 4)
    W, b = rng.normal(size=(2, 3)), rng.normal(size=2)
    q0 = np.full(3, 1 / 3)
    gW, gb, q, loss = groupdro_step(W, b, X, yi, gi, q0, eta=0.5, weight_decay=0.0)

    def group_losses(W, b):
        z = X @ W.T + b
        nll = np.log(np.exp(z).sum(1)) - z[np.arange(12), yi]
        return np.array([nll[gi == g].mean() for g in range(3)])

    lg = group_losses(W, b)
    np.testing.assert_allclose(q, q0 * np.exp(0.5 * lg) / (q0 * np.exp(0.5 * lg)).sum())
    assert np.argmax(q) == np.argmax(lg) and loss == pytest.approx(float(q @ lg))
    eps, num = 1e-6, np.zeros_like(W)  # finite differences of sum_g q_g l_g at the updated (fixed) q
    for i in np.ndindex(W.shape):
        d = np.zeros_like(W)
        d[i] = eps
        num[i] = (q @ group_losses(W + d, b) - q @ group_losses(W - d, b)) / (2 * eps)
    np.testing.assert_allclose(gW, num, rtol=1e-5, atol=1e-7)


def test_error_set_is_everything_outside_a_class_s_largest_group():
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1])
    groups = np.array([5, 5, 5, 7, 2, 2, 9, 9, 9])
    assert error_set_from_groups(y, groups).tolist() == [0, 0, 0, 1, 1, 1, 0, 0, 0]


def test_registry_modes_and_spec_validation():
    assert RETRAINERS.get("dfr").modes == ("last_layer",)
    assert RETRAINERS.get("groupdro").modes == RETRAINERS.get("jtt").modes == ("last_layer", "end_to_end")
    r = from_dict({}).retrain
    assert (r.method, r.mode, r.groupdro.eta, r.jtt.upweight) == ("dfr", "last_layer", 0.01, 20.0)
    with pytest.raises(SpecError, match="'end_to_end' is not available for retrain.method 'dfr'"):
        from_dict({"retrain": {"mode": "end_to_end"}})
    # (dpe is registered too where the `dpe` extra is installed)
    with pytest.raises(
        SpecError, match=r"retrain.method': unknown retrainer 'dro'. Registered: dfr, (dpe, )?groupdro, jtt"
    ):
        from_dict({"retrain": {"method": "dro"}})
    with pytest.raises(SpecError, match=r"spec key 'retrain.groupdro.eta': got 0"):
        from_dict({"retrain": {"groupdro": {"eta": 0}}})


@pytest.mark.parametrize("method", ["groupdro", "jtt"])
def test_end_to_end_fine_tunes_a_copy_of_test_resnet(method):
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=2).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.rand(24, 3, 28, 28)
    y = np.array([0, 1] * 12)
    groups = np.array([0, 1] * 10 + [2, 3] * 2)  # 2 small groups: the DRO weights must favour someone
    spec = from_dict({"retrain": {"method": method, "mode": "end_to_end", "end_to_end": {"lr": 0.05, "batch_size": 8}}})
    r = RETRAINERS.get(method)
    res = r.finetune(model, images, y, groups, r.config(spec), seed=0, max_steps=3)
    assert res.steps == 3 and len(res.losses) == 3 and all(np.isfinite(res.losses))
    changed = [k for k, v in res.model.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert any("fc" in k for k in changed) and any("conv" in k for k in changed)  # head and body both moved
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the input model is untouched
    pred = res.predict(images, batch_size=10)
    assert pred.shape == (24,) and set(pred.tolist()) <= {0, 1}
    if method == "groupdro":
        assert res.q.shape == (4,) and res.q.sum() == pytest.approx(1.0) and not np.allclose(res.q, 0.25)
    else:
        assert res.q is None
