"""The `dpe` retrainer (exmap_ray/retrain/dpe.py): Diverse Prototypical Ensembles through the `dpe` package,
run for real on tiny planted features. Skipped where dpe is not installed (pip install 'exmap-ray[dpe]');
the test that the spec and the CLI work without it runs either way.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from exmap_ray import plugins
from exmap_ray.metrics import evaluate
from exmap_ray.retrain import RETRAINERS, Head
from exmap_ray.retrain.dpe import dpe_installed
from exmap_ray.spec import from_dict

assert plugins
needs_dpe = pytest.mark.skipif(not dpe_installed(), reason="dpe not installed: pip install 'exmap-ray[dpe]'")
NAMES = ["y0/s0", "y0/s1", "y1/s0", "y1/s1"]
# small: 8 members of 10 epochs; the covariance weight scaled down for 32-d features (5e5 suits 2048-d ones)
SMALL = {"n_members": 8, "epochs": 10, "cov_reg_grid": [1e3]}


def planted(n, rho, seed, d=32):
    """Features as a frozen network might give them: a weak core direction (the class y) and a strong
    shortcut direction (s, which agrees with y w.p. rho) plus isotropic noise; group = 2 y + s."""
    core, shortcut = np.linalg.qr(np.random.default_rng(99).normal(size=(d, 2)))[0].T
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    s = np.where(rng.random(n) < rho, y, 1 - y)
    X = 0.5 * rng.normal(size=(n, d)) + (2 * y - 1)[:, None] * core + 2 * (2 * s - 1)[:, None] * shortcut
    return X.astype(np.float32), y, 2 * y + s


def fit(X, y, groups, seed=0, repeats=1, **keys):
    r = RETRAINERS.get("dpe")
    spec = from_dict({"retrain": {"n_select_repeats": repeats, "dpe": {**SMALL, **keys}}})
    return r.fit(X, y, groups, r.config(spec), seed)


@needs_dpe
def test_dpe_without_group_labels_beats_erm_on_the_worst_group():
    """ERM (a linear model on a train split where the shortcut holds 98% of the time) fails on the groups
    that break it; DPE retrained on val (shortcut 70%), choosing by worst-class accuracy, does better."""
    Xtr, ytr, _ = planted(2000, 0.98, 100)
    Xv, yv, gv = planted(400, 0.7, 0)
    Xt, yt, gt = planted(4000, 0.5, 10)
    erm = evaluate(LogisticRegression().fit(Xtr, ytr).predict(Xt), yt, gt, NAMES, gv)["worst_group_acc"]
    model = fit(Xv, yv, yv, repeats=2)  # groups = classes: no group label anywhere
    assert isinstance(model, Head) and model.prototypes.shape == (8, 2, 32)
    dpe = evaluate(model.predict(Xt), yt, gt, NAMES, gv)["worst_group_acc"]
    assert erm < 0.75 and dpe > erm + 0.1
    assert model.chosen == {"cov_reg": 1e3} and set(model.heldout) == {"pseudo", "class"}
    assert model.heldout["pseudo"] == model.heldout["class"]  # the groups were the classes
    assert model.heldout_idx.shape == model.heldout_pred.shape == (2, 200)


@needs_dpe
def test_dpe_is_deterministic_per_seed_and_leaves_the_global_state_alone():
    import torch

    Xv, yv, gv = planted(300, 0.7, 1)
    torch.manual_seed(123)
    np.random.seed(123)
    torch_state, np_state, threads = (
        torch.get_rng_state().clone(),
        np.random.get_state()[1].copy(),
        torch.get_num_threads(),
    )
    a = fit(Xv, yv, gv, seed=3, n_members=3, epochs=3)
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], np_state)
    assert torch.get_num_threads() == threads
    b = fit(Xv, yv, gv, seed=3, n_members=3, epochs=3)
    c = fit(Xv, yv, gv, seed=4, n_members=3, epochs=3)
    assert np.array_equal(a.prototypes, b.prototypes) and np.array_equal(a.heldout_pred, b.heldout_pred)
    assert not np.array_equal(a.prototypes, c.prototypes)
    assert np.array_equal(a.predict(Xv), b.predict(Xv))


@needs_dpe
def test_dpe_takes_several_classes_and_scores_extra_groupings():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 40)
    X = (rng.normal(size=(3, 16))[y] * 3 + rng.normal(size=(120, 16))).astype(np.float32)
    noise = rng.integers(0, 4, len(y))
    r = RETRAINERS.get("dpe")
    spec = from_dict({"retrain": {"n_select_repeats": 1, "dpe": {"n_members": 2, "epochs": 3}}})
    model = r.fit(X, y * 10, y, r.config(spec), 0, score_groups={"true": noise})
    assert set(np.unique(model.predict(X))) <= {0, 10, 20} and (model.predict(X) == y * 10).mean() > 0.9
    assert "true" in model.heldout and model.proba(X).shape == (120, 3)


@needs_dpe
def test_epoch_choice_reads_the_same_worst_group_accuracy_as_the_package():
    """The lean evaluator that scores each member's epochs gives what dpe's own evaluation reports there."""
    from dpe import core

    from exmap_ray.retrain.dpe import _Rows, _loader, _shelf, worst_group_accuracy

    Xv, yv, gv = planted(200, 0.7, 2)
    model = core._init_model(num_classes=2, model=_shelf(32), loss_name="isomax", device="cpu")
    loader = _loader(_Rows(Xv, yv, gv, 2), 64)
    assert worst_group_accuracy(model, loader)["min_group"]["accuracy"] == pytest.approx(
        core._evaluate(model, loader, device="cpu")["min_group"]["accuracy"]
    )


def test_the_spec_and_the_cli_work_without_dpe():
    """Without the dpe package (hidden here), `exmap-ray spec` prints, the spec has no retrain.dpe section,
    and asking for the method names the extra to install."""
    code = "\n".join(
        [
            "import sys; sys.modules['dpe'] = None",  # find_spec('dpe') is then None: as if not installed
            "from exmap_ray import plugins; from exmap_ray.cli import main; from exmap_ray.spec import from_dict",
            "from exmap_ray.errors import SpecError",
            "assert 'dpe' not in plugins.retrain.RETRAINERS.names()",
            "assert not hasattr(from_dict({}).retrain, 'dpe')",
            "try:",
            "    from_dict({'retrain': {'method': 'dpe'}})",
            "except SpecError as e:",
            "    print('ERR', e)",
            "sys.exit(main(['spec']))",
            "",
        ]
    )
    path = [p for p in (os.getcwd(), os.environ.get("PYTHONPATH")) if p]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ERR spec key 'retrain.method': retrainer 'dpe' runs Diverse Prototypical Ensembles" in out.stdout
    assert "pip install 'exmap-ray[dpe]'" in out.stdout and "retrain:" in out.stdout
