"""Peers: SpuCo's group-inference methods as group sources, so `bench` compares ExMap with code nobody
here wrote (pip install 'exmap-ray[peers]', which pins spuco 2.0.3).

    groups, info = infer_groups("spuco_spare", ctx)     # any GroupContext with val_features / val_logits

Each source: its SpuCo class; its input (ERM model, val split); its groups.
- spuco_george: GeorgeInference (Sohoni et al. 2020); penultimate features; per class: UMAP to 2-D,
  GMM with k by silhouette over 2..clustering.k_max, then GEORGE's over-clustering
- spuco_spare: SpareInference (Yang et al. 2023); softmax of the logits (as SpuCo's examples); per class:
  k-means with k by silhouette over 2..clustering.k_max
- spuco_eiil: EIIL (Creager et al. 2021); logits; two environments by EIIL's IRM-penalty maximisation;
  group = class x environment

SpuCo's CNC inference is not offered (it crashes inside spuco 2.0.3). SPARE's sampling powers and
GEORGE's and EIIL's own retraining are not used: every peer feeds the same retrainer (DFR in `bench`),
as ExMap does, so a row differs from ExMap's only in how it finds the groups. EIIL's environments are
crossed with the class (SpuCo hands back environments alone), because DFR's groups each hold one class.
As for every clustering source here, a (class, group) pair under `clustering.min_group_size` merges into
the nearest same-class group (by centroid in the method's own input); `info["merged"]` lists them.

The sources are registered when the `spuco` package is installed (found without importing it: importing
SpuCo loads UMAP and numba, about 20 s), and SpuCo is imported when a source first runs. Without it,
asking for one raises a SpecError naming the extra to install. The global random state SpuCo seeds (its
`seed_randomness` reseeds numpy, torch and random) is restored afterwards.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import io
import logging
import random
import sys

import numpy as np

from ..errors import UserError
from .formation import class_by_cluster, merge_small
from .sources import GROUP_SOURCES, GroupContext

log = logging.getLogger(__name__)

SPUCO_VERSION = "2.0.3"
INSTALL = "pip install 'exmap-ray[peers]'"
EIIL_STEPS = 10_000  # SpuCo's EIIL scripts use 10,000 steps at lr 1e-3 (its sweeps: 10k or 20k; 1e-2 or 1e-3)
EIIL_LR = 1e-3
PEER_SOURCES = {"spuco_george": "GEORGE", "spuco_spare": "SPARE", "spuco_eiil": "EIIL"}


def spuco_installed() -> bool:
    return importlib.util.find_spec("spuco") is not None


@contextlib.contextmanager
def _no_version_check():
    """Importing SpuCo imports wilds, whose import starts a thread asking PyPI for a newer wilds (the
    `outdated` package). It fails quietly here only because setuptools >= 81 lacks pkg_resources; hiding
    `outdated` while SpuCo first imports makes wilds skip the check, so nothing is fetched at run time."""
    hide = "outdated" not in sys.modules and "wilds" not in sys.modules
    if hide:
        sys.modules["outdated"] = None  # `from outdated import ...` raises ImportError, which wilds expects
    try:
        yield
    finally:
        if hide and sys.modules.get("outdated", 0) is None:
            del sys.modules["outdated"]


def _spuco():
    """SpuCo's group_inference module and its set_seed, or a UserError saying how to get them."""
    try:
        with _no_version_check():
            import spuco
            from spuco import group_inference
            from spuco.utils.random_seed import set_seed
    except ImportError as e:
        raise UserError(
            f"the SpuCo peers need spuco {SPUCO_VERSION}, which does not import here "
            f"({type(e).__name__}: {e}); {INSTALL} installs it"
        ) from None
    version = getattr(spuco, "__version__", None)
    if version not in (None, SPUCO_VERSION):
        log.warning("peers: spuco %s found; these sources were written and tested against %s", version, SPUCO_VERSION)
    return group_inference, set_seed


@contextlib.contextmanager
def _seeded(seed: int):
    """SpuCo seeds the process-wide numpy, torch and random states from its own global seed: set that seed,
    and put every global state back afterwards, torch's thread count too (SpuCo's prints go to the debug log)."""
    import torch

    _, set_seed = _spuco()
    states = np.random.get_state(), random.getstate(), torch.get_rng_state()
    threads = torch.get_num_threads()
    out = io.StringIO()
    try:
        set_seed(int(seed))
        torch.set_num_threads(1)  # EIIL's 10,000 steps on one vector: threads only add overhead (and contention)
        with contextlib.redirect_stdout(out):
            yield
    finally:
        np.random.set_state(states[0])
        random.setstate(states[1])
        torch.set_rng_state(states[2])
        torch.set_num_threads(threads)
        if out.getvalue().strip():
            log.debug("spuco: %s", out.getvalue().strip())


def partition_to_clusters(partition: dict, n: int) -> np.ndarray:
    """SpuCo's {(class or 0, cluster): [val indices]} as one cluster id per point (0..len(partition)-1);
    every point must appear exactly once."""
    cluster_of = np.full(n, -1, np.int64)
    for i, key in enumerate(sorted(partition)):
        idx = np.asarray(partition[key], np.int64)
        if (cluster_of[idx] != -1).any():
            raise ValueError(f"spuco put val point {int(idx[cluster_of[idx] != -1][0])} in two groups")
        cluster_of[idx] = i
    if (cluster_of == -1).any():
        raise ValueError(f"spuco left {int((cluster_of == -1).sum())} of {n} val points without a group")
    return cluster_of


def finish_groups(
    X: np.ndarray, y: np.ndarray, cluster_of: np.ndarray, min_size: int, extra: dict
) -> tuple[np.ndarray, dict]:
    """Merge small (class, cluster) pairs as every clustering source does; dense class x cluster ids."""
    cluster_of, merges = merge_small(np.asarray(X, np.float32), y, cluster_of, min_size)
    return class_by_cluster(y, cluster_of), {**extra, "merged": merges}


@contextlib.contextmanager
def umap_seeded(seed: int):
    """SpuCo's GEORGE builds `umap.UMAP(...)` without a random_state, so UMAP runs numba's parallel threads
    and its embedding (and GEORGE's groups) changes from run to run whatever global seed is set. Inside
    this block a UMAP made without one gets `random_state=seed` (UMAP's documented way to be reproducible;
    it then runs on one thread). The umap module is put back afterwards."""
    import umap

    original = umap.UMAP

    @functools.wraps(original, updated=())
    def seeded(*args, **kwargs):
        kwargs.setdefault("random_state", int(seed))
        return original(*args, **kwargs)

    umap.UMAP = seeded
    try:
        yield
    finally:
        umap.UMAP = original


def george(features: np.ndarray, y: np.ndarray, k_max: int, seed: int) -> np.ndarray:
    """SpuCo's GEORGE on penultimate features: one cluster id per point (clusters are per class); the same
    groups for the same seed (umap_seeded)."""
    import torch

    gi, _ = _spuco()
    with _seeded(seed), umap_seeded(seed):
        inf = gi.GeorgeInference(
            Z=torch.as_tensor(np.asarray(features, np.float32)), class_labels=y.tolist(), max_clusters=k_max
        )
        partition = inf.infer_groups()
    return partition_to_clusters(partition, len(y))


def spare(logits: np.ndarray, y: np.ndarray, k_max: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """SpuCo's SPARE on the softmax of the logits: (cluster id per point, the softmax it clustered).

    SpuCo is called one class at a time (what its class-wise mode does; its k-means seed is fixed, so the
    result is the same). A class whose softmax rows are all alike (fewer than 2 distinct rows, e.g. a
    saturated model) stays one cluster: SpuCo's silhouette search raises on it.
    """
    import torch

    gi, _ = _spuco()
    z = np.asarray(logits, np.float64)
    probs = np.exp(z - z.max(1, keepdims=True))
    probs = (probs / probs.sum(1, keepdims=True)).astype(np.float32)
    cluster_of = np.zeros(len(y), np.int64)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        distinct = len(np.unique(probs[idx], axis=0))
        if distinct < 3:  # a silhouette needs 2 to n-1 labels among distinct points
            log.info("spuco_spare: class %d has %d distinct softmax row(s); it stays one group", int(c), distinct)
            continue
        with _seeded(seed):
            inf = gi.SpareInference(logits=torch.as_tensor(probs[idx]), max_clusters=min(k_max, distinct - 1))
            partition = inf.infer_groups()
        cluster_of[idx] = partition_to_clusters(partition, len(idx))
    return cluster_of, probs


def eiil(logits: np.ndarray, y: np.ndarray, seed: int, steps: int = EIIL_STEPS, lr: float = EIIL_LR) -> np.ndarray:
    """SpuCo's EIIL on the logits: the environment (0 or 1) of each point."""
    import torch

    gi, _ = _spuco()
    with _seeded(seed):
        inf = gi.EIIL(
            logits=torch.as_tensor(np.asarray(logits, np.float32)), class_labels=y.tolist(), num_steps=steps, lr=lr
        )
        partition = inf.infer_groups()
    env = np.zeros(len(y), np.int64)
    for (_, e), idx in partition.items():
        env[np.asarray(idx, np.int64)] = int(e)
    return env


def _missing(name: str) -> str | None:
    """Why peer `name` cannot run here (spuco absent), or None: its registration keeps the name known."""
    return (
        None
        if spuco_installed()
        else (f"runs SpuCo's {PEER_SOURCES[name]} (spuco {SPUCO_VERSION}), which is not installed: {INSTALL}")
    )


@GROUP_SOURCES.register("spuco_george", needs=("val_features",), unavailable=_missing("spuco_george"))
def george_source(ctx: GroupContext) -> tuple[np.ndarray, dict]:
    """GEORGE (SpuCo) on the ERM model's penultimate val features, per class."""
    y = np.asarray(ctx.y_val, np.int64)
    cluster_of = george(ctx.val_features, y, ctx.clustering.k_max, ctx.seed)
    return finish_groups(ctx.val_features, y, cluster_of, ctx.clustering.min_group_size, {"spuco": SPUCO_VERSION})


@GROUP_SOURCES.register("spuco_spare", needs=("val_logits",), unavailable=_missing("spuco_spare"))
def spare_source(ctx: GroupContext) -> tuple[np.ndarray, dict]:
    """SPARE (SpuCo) on the softmax of the ERM model's val logits, per class."""
    y = np.asarray(ctx.y_val, np.int64)
    cluster_of, probs = spare(ctx.val_logits, y, ctx.clustering.k_max, ctx.seed)
    return finish_groups(probs, y, cluster_of, ctx.clustering.min_group_size, {"spuco": SPUCO_VERSION})


@GROUP_SOURCES.register("spuco_eiil", needs=("val_logits",), unavailable=_missing("spuco_eiil"))
def eiil_source(ctx: GroupContext) -> tuple[np.ndarray, dict]:
    """EIIL (SpuCo) on the ERM model's val logits: group = class x environment."""
    y = np.asarray(ctx.y_val, np.int64)
    env = eiil(ctx.val_logits, y, ctx.seed)
    return finish_groups(
        ctx.val_logits,
        y,
        env,
        ctx.clustering.min_group_size,
        {"spuco": SPUCO_VERSION, "eiil_steps": EIIL_STEPS, "eiil_lr": EIIL_LR},
    )


def available() -> list[str]:
    """The peer sources registered here (all of them when SpuCo is installed, else none)."""
    return [n for n in PEER_SOURCES if n in GROUP_SOURCES]


__all__ = ["PEER_SOURCES", "available", "spuco_installed", "george", "spare", "eiil", "partition_to_clusters"]
