"""SpuCo's GEORGE, SPARE and EIIL as group sources (exmap_ray/groups/peers.py), run for real on tiny planted data.

Skipped where spuco is not installed (pip install 'exmap-ray[peers]'); the registry test below runs
either way. Importing SpuCo takes about 20 s (UMAP, numba), and GEORGE's first UMAP compiles with numba.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from exmap_ray import plugins, registry
from exmap_ray.errors import SpecError
from exmap_ray.groups import GROUP_SOURCES, GroupContext, infer_groups
from exmap_ray.metrics import agreement
from exmap_ray.groups.peers import (
    PEER_SOURCES,
    _spuco,
    eiil,
    finish_groups,
    partition_to_clusters,
    spuco_installed,
    umap_seeded,
)
from exmap_ray.spec import ClusteringSpec, from_dict

assert plugins
needs_spuco = pytest.mark.skipif(not spuco_installed(), reason="spuco not installed: pip install 'exmap-ray[peers]'")
NAMES = ["a", "b", "c", "d"]


def planted(seed=0, n_maj=80, n_min=25, d=8):
    """Two classes, each a majority and a minority subgroup (s = the shortcut). Features: one blob per
    subgroup. Logits: a model that predicts the shortcut s, so each minority is confidently wrong."""
    rng = np.random.default_rng(seed)
    sub = np.repeat(np.arange(4), [n_maj, n_min, n_maj, n_min])  # (y, s) = (0,0) (0,1) (1,1) (1,0)
    y, s = sub // 2, np.array([0, 1, 1, 0])[sub]
    X = (rng.normal(size=(4, d))[sub] * 4 + 0.4 * rng.normal(size=(len(sub), d))).astype(np.float32)
    logits = np.stack([-3.0 * (2 * s - 1), 3.0 * (2 * s - 1)], 1) + 0.3 * rng.normal(size=(len(sub), 2))
    return X, y, sub, logits.astype(np.float32)


def ctx_for(X, y, logits, **clustering):
    return GroupContext(y_val=y, clustering=ClusteringSpec(**clustering), seed=0, val_features=X, val_logits=logits)


def test_peer_names_are_known_with_or_without_spuco():
    """Installed: the three sources are registered and a spec may name them. Not installed: asking for
    one names the extra to install, not 'unknown'."""
    if spuco_installed():
        assert set(PEER_SOURCES) <= set(GROUP_SOURCES.names())
        assert from_dict({"groups": {"source": "spuco_spare"}}).groups.source == "spuco_spare"
    else:
        with pytest.raises(SpecError, match=r"spuco_george.*pip install 'exmap-ray\[peers\]'"):
            from_dict({"groups": {"source": "spuco_george"}})
    # the mechanism, on a registry of its own: a known-but-absent name says why
    reg = registry.Registry("widget", "test_peers.widget")
    reg.unavailable("fancy", "needs the fancy extra: pip install 'exmap-ray[fancy]'")
    with pytest.raises(
        SpecError,
        match=r"spec key 'test_peers.widget': widget 'fancy' needs the fancy extra: "
        r"pip install 'exmap-ray\[fancy\]'",
    ):
        reg.get("fancy")
    assert reg.names() == []


def test_partition_to_clusters_checks_coverage():
    assert partition_to_clusters({(0, 1): [2, 0], (0, 0): [1]}, 3).tolist() == [1, 0, 1]
    with pytest.raises(ValueError, match="left 1 of 3 val points"):
        partition_to_clusters({(0, 0): [0, 1]}, 3)
    with pytest.raises(ValueError, match="val point 1 in two groups"):
        partition_to_clusters({(0, 0): [0, 1], (1, 0): [1, 2]}, 3)


@needs_spuco
def test_spuco_imports_without_wilds_asking_pypi_for_its_version():
    """SpuCo imports wilds, whose import would start a thread that asks PyPI whether wilds is outdated;
    peers imports SpuCo with that check off (wilds finds no `outdated`), and `outdated` is importable after."""
    import importlib
    import sys

    if "wilds" in sys.modules and "spuco" not in sys.modules:
        pytest.skip("wilds was imported before SpuCo in this process, not through peers")
    _spuco()
    assert sys.modules["wilds.version"].check_outdated is None  # no version-check thread was started
    assert importlib.import_module("outdated") is not None  # hidden only while SpuCo imported


@needs_spuco
def test_spare_finds_the_planted_groups_in_the_softmax():
    """SPARE clusters each class's softmax outputs: the confidently wrong minority is its own cluster."""
    X, y, sub, logits = planted()
    groups, info = infer_groups("spuco_spare", ctx_for(X, y, logits))
    assert info["source"] == "spuco_spare" and info["spuco"] == "2.0.3" and info["merged"] == []
    assert agreement(groups, sub, NAMES)["ari"] == 1.0
    again, _ = infer_groups("spuco_spare", ctx_for(X, y, logits))
    assert np.array_equal(groups, again)  # seeded


@needs_spuco
def test_eiil_environments_crossed_with_the_class_and_the_global_random_state_left_alone():
    """EIIL splits val into two environments; crossed with the class, each group holds one class. SpuCo
    reseeds numpy, torch and random: the caller's states come back unchanged. (The source runs SpuCo's
    10,000 steps, in the registry contract test; here 300 keep it short.)"""
    import torch

    X, y, sub, logits = planted()
    np.random.seed(123)
    random.seed(123)
    torch.manual_seed(123)
    states = np.random.get_state()[1].copy(), random.getstate(), torch.get_rng_state().clone()
    env = eiil(logits, y, seed=0, steps=300, lr=1e-2)
    assert np.array_equal(np.random.get_state()[1], states[0]) and random.getstate() == states[1]
    assert torch.equal(torch.get_rng_state(), states[2])
    assert env.shape == y.shape and set(np.unique(env)) <= {0, 1}
    assert np.array_equal(env, eiil(logits, y, seed=0, steps=300, lr=1e-2))  # seeded
    groups, info = finish_groups(logits, y, env, min_size=5, extra={})
    assert all(len(np.unique(y[groups == g])) == 1 for g in np.unique(groups))
    assert len(np.unique(groups)) == len(np.unique(np.stack([y, env], 1), axis=0)) - len(info["merged"])


@needs_spuco
def test_george_clusters_features_per_class_and_small_groups_merge():
    X, y, sub, logits = planted()
    groups, info = infer_groups("spuco_george", ctx_for(X, y, logits, k_max=4))
    assert all(len(np.unique(y[groups == g])) == 1 for g in np.unique(groups))
    assert agreement(groups, sub, NAMES)["worst_recovery"] == 1.0
    # with a minimum above every group's size each class collapses to one group: pseudo group = class
    merged, info = infer_groups("spuco_george", ctx_for(X, y, logits, k_max=4, min_group_size=1000))
    assert np.array_equal(merged, y) and info["n_groups"] == 2


@needs_spuco
def test_george_is_reproducible_for_a_seed_and_umap_is_put_back():
    import umap

    _spuco()  # SpuCo's own modules import umap; the block seeds the class they call
    original = umap.UMAP
    with umap_seeded(5):
        assert umap.UMAP(n_components=2).random_state == 5
        assert umap.UMAP(n_components=2, random_state=9).random_state == 9  # an explicit one wins
    assert umap.UMAP is original and umap.UMAP(n_components=2).random_state is None
    X, y, _, logits = planted(seed=3, n_maj=120, n_min=40, d=16)
    runs = [infer_groups("spuco_george", ctx_for(X, y, logits, k_max=6))[0] for _ in range(2)]
    assert np.array_equal(runs[0], runs[1])
