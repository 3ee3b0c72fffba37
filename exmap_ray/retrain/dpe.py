"""Diverse Prototypical Ensembles (To et al., ICML 2025) on the last layer, through the `dpe` package
(pip install 'exmap-ray[dpe]', which pins dpe 0.2.0 and netcal, its metrics' dependency).

    model = fit_dpe(val_features, y_val, groups, RETRAINERS.get("dpe").config(spec), seed=0)
    pred = model.predict(test_features)

The ERM network stays frozen; its penultimate val features are standardised with val statistics (as
DFR's are), then standardised per sample (DPE's own `norm_emb`). An ensemble of `n_members` IsoMax+
prototype heads (one prototype per class, distance-based logits) is trained one after another, each
by SGD on a fresh class-balanced random subset of the points it is given (every class cut down to
the smallest), with an L2 pull on its prototypes and a penalty on their covariance with the earlier
members' (decaying from `cov_reg` by `alpha`), so that the members differ. Each member keeps its
epoch of best worst-group accuracy over the points it was trained from. The ensemble predicts the
mean of the members' softmax. All of this is the package's code (`dpe.core._train_ensemble`, its
IsoMax+ head, `dpe.core._predict`), handed in-memory tensors, with one substitution: while the
ensemble trains, `dpe.core._evaluate` is replaced by `worst_group_accuracy`, the one number of it
that DPE reads (its AUROC, ECE, ... took 0.3 s an epoch, most of a fit; a test checks the two agree).
Its `DPE` class is not used: it reads features and metadata only from files, and (0.2.0) balances its
subsets on the metadata's attribute column whenever `train_attr` is truthy, `'no'` included.

Which variant, and where groups enter. DPE has two variants: with attribute labels each member is
trained on a group-balanced subset (`train_attr` yes); without them (`train_attr` no, the paper's
"no group annotations" setting) on a class-balanced one. This is the second: no group enters
training. The given `groups` enter only where DPE reads its validation groups, i.e. each member's
choice of epoch, and the choice of `cov_reg_grid` on held-out halves (`common.select_on_halves`,
as every retrainer here). The released code reads the dataset's own validation groups there (its
no-attribute notebook hands it the true ones); here they are the given groups, never the true
ones. `bench`'s row "DPE (no group labels)" gives the classes (the `class` source), so every choice
is by worst-class accuracy and no group is inferred or used: the paper's label-free setting. Given
ExMap's pseudo groups instead, the choices follow the worst pseudo group. Runs on CPU.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import warnings
from dataclasses import dataclass, field
from functools import partial

import numpy as np

from .base import RETRAINERS
from ..errors import UserError
from ..options import non_negative, opt, positive, positive_list
from .common import check_inputs, select_on_halves, standardise

log = logging.getLogger(__name__)

DPE_VERSION = "0.2.0"
INSTALL = "pip install 'exmap-ray[dpe]'"
EVAL_BATCH = 4096  # rows per forward pass when predicting or scoring a member's epoch


@dataclass
class DpeKeys:
    """DPE's section of the spec, `retrain.dpe` (defaults: the package's, its released Waterbirds run's)."""

    n_members: int = opt(
        15,
        "prototype classifiers in the ensemble, trained one after another (DPE's "
        "num_stages; 15 in the package and the paper)",
        positive,
        search={"choice": [5, 15, 30]},
    )
    epochs: int = opt(
        20,
        "passes of each member over its class-balanced subset; each member keeps its "
        "epoch of best worst-group accuracy on the points it was trained from",
        positive,
    )
    lr: float = opt(
        1e-3,
        "SGD step size (momentum 0.9, constant), as in the package and its Waterbirds run",
        positive,
        search={"loguniform": [1e-4, 1e-2]},
    )
    batch_size: int = opt(
        256,
        "minibatch of a member's training (the last partial batch is dropped, as in "
        "the package; a subset smaller than this is one batch)",
        positive,
    )
    cov_reg_grid: list[float] = opt(
        [5e5],
        "initial weight of the inter-prototype covariance penalty (the members' diversity) tried, "
        "chosen by held-out worst given-group accuracy; 5e5 is the released Waterbirds and CelebA "
        "runs' (the package defaults to 5e4). The penalty is divided by the feature width, and "
        "these values were set on 2048-d features: narrower ones may want less",
        positive_list,
        search={"choice": [[5e4], [1e5], [5e5], [5e4, 1e5, 5e5]]},
    )
    alpha: float = opt(
        0.05, "decay of the covariance weight over members: member m gets cov_reg / (1 + alpha (m - 1))", non_negative
    )
    wd_weight: float = opt(
        10.0, "weight of the L2 penalty on a member's prototypes (the package's wd_weight)", non_negative
    )
    entropic: float = opt(30.0, "IsoMax+ entropic scale of the training loss (the package's)", positive)


@dataclass
class DPEModel:
    """The fitted ensemble: per member, (n_classes, d) prototypes and a distance scale, on features
    standardised with `mean`/`std` and then per sample. A `Head` (retrain/base.py)."""

    mean: np.ndarray
    std: np.ndarray
    prototypes: np.ndarray  # (members, n_classes, d)
    scales: np.ndarray  # (members,) distance scales
    classes: np.ndarray
    chosen: dict  # {"cov_reg": ...}
    selection: dict  # cov_reg -> {"pseudo": ..., "class": ..., **extra}: held-out worst accuracies
    heldout_idx: np.ndarray
    heldout_pred: np.ndarray
    extra: dict = field(default_factory=dict)

    @property
    def heldout(self) -> dict:
        return self.selection[self.chosen["cov_reg"]]

    def proba(self, feats: np.ndarray) -> np.ndarray:
        """(N, n_classes): the members' softmax, averaged (DPE's prediction)."""
        X = per_sample((np.asarray(feats, np.float64) - self.mean) / self.std)
        return _predict_proba(self.prototypes, self.scales, X)

    def predict(self, feats: np.ndarray) -> np.ndarray:
        return self.classes[self.proba(feats).argmax(1)]


def dpe_installed() -> bool:
    """Found without importing it: dpe's import pulls in netcal (and pyro, gpytorch), about 20 s."""
    return all(importlib.util.find_spec(m) is not None for m in ("dpe", "netcal"))


def _core():
    try:
        import dpe
        from dpe import core
    except ImportError as e:
        raise UserError(
            f"retrain.method dpe needs dpe {DPE_VERSION} and netcal, which do not import here "
            f"({type(e).__name__}: {e}); {INSTALL} installs them"
        ) from None
    if getattr(dpe, "__version__", None) != DPE_VERSION:
        log.warning(
            "dpe %s found; this retrainer was written and tested against %s",
            getattr(dpe, "__version__", "?"),
            DPE_VERSION,
        )
    return core


def per_sample(X: np.ndarray) -> np.ndarray:
    """DPE's `norm_emb`: each feature row centred and scaled by its own mean and std."""
    return (X - X.mean(1, keepdims=True)) / (X.std(1, keepdims=True) + 1e-12)


class _Rows:
    """Feature rows as DPE's loaders read them: item = a list of row indices, returned as one batch
    (index, dummy image, label, attribute, features), and the `y`, `_a`, `g`, `num_labels` its
    evaluation reads. The attribute is 0 everywhere: DPE's no-attribute setting."""

    def __init__(self, X, yi, gi, n_classes: int):
        import torch

        self.feats = torch.as_tensor(np.asarray(X, np.float32))
        self.labels = torch.as_tensor(np.asarray(yi, np.int64))
        self.y, self.g = np.asarray(yi).tolist(), np.asarray(gi).tolist()
        self._a = [0] * len(self.y)
        self.zeros = torch.zeros(len(self.y), dtype=torch.long)
        self.num_labels = n_classes

    def __len__(self):
        return len(self.y)

    def __getitem__(self, idx):
        import torch

        idx = torch.as_tensor(idx)  # a list of indices from the batch sampler
        return idx, self.zeros[idx], self.labels[idx], self.zeros[idx], self.feats[idx]


def _loader(rows: _Rows, batch: int, shuffle: bool = False, generator=None, drop_last: bool = False):
    """A DataLoader whose every item is a whole batch of row indices (no per-row collation)."""
    from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler

    sampler = RandomSampler(rows, generator=generator) if shuffle else SequentialSampler(rows)
    return DataLoader(rows, sampler=BatchSampler(sampler, batch, drop_last), batch_size=None)


def _eval_batch(n: int) -> int:
    # dpe.core._predict squeezes each batch: a batch of one row would lose its row axis
    b = min(EVAL_BATCH, n)
    return b + 1 if n % b == 1 and b < n else b


def class_balanced(yi: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Indices of a random subset with every class cut down to the smallest class (DPE's subset without
    attribute labels)."""
    members = [np.flatnonzero(yi == c) for c in np.unique(yi)]
    m = min(len(i) for i in members)
    return np.concatenate([rng.choice(i, m, replace=False) for i in members])


def worst_group_accuracy(model, loader, device="cpu") -> dict:
    """What `dpe.core._train_prototypes` reads of `dpe.core._evaluate` to pick a member's epoch,
    {"min_group": {"accuracy": the lowest per-group accuracy of the argmax predictions}}, without the
    other metrics `_evaluate` also computes (AUROC, ECE, ...): those took 0.3 s per epoch, most of a fit."""
    import torch

    rows = loader.dataset
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(feats.to(device)).argmax(1).cpu() for *_, feats in loader]).numpy()
    right, g = pred == np.asarray(rows.y), np.asarray(rows.g)
    return {"min_group": {"accuracy": float(min(right[g == v].mean() for v in np.unique(g)))}}


@contextlib.contextmanager
def _lean_and_seeded(core, seed: int):
    """DPE draws its prototype inits from torch's global generator and prints a progress bar: seed a fork
    of that generator (the caller's comes back unchanged), keep the bar and metric warnings out, run torch
    on one thread (tiny matrices: more threads only contend), and score epochs by `worst_group_accuracy`."""
    import torch

    threads, evaluate = torch.get_num_threads(), core._evaluate
    try:
        with torch.random.fork_rng(devices=[]), contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.set_num_threads(1)
            torch.manual_seed(int(seed))
            core._evaluate = worst_group_accuracy
            yield
    finally:
        core._evaluate = evaluate
        torch.set_num_threads(threads)


def _shelf(d: int):
    """DPE's head-only model for pre-extracted features: identity 'backbone', the head replaced per member."""
    from torch import nn

    model = nn.Sequential(nn.Identity(), nn.Identity())
    model.emb_dim = d
    return model


def train_ensemble(
    X: np.ndarray, yi: np.ndarray, gi: np.ndarray, n_classes: int, k, cov_reg: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """DPE's ensemble on rows X (standardised per sample) with class indices `yi`; `gi` choose each member's
    epoch. Returns (prototypes (members, n_classes, d), distance scales (members,))."""
    import torch

    core = _core()
    rows = _Rows(X, yi, gi, n_classes)
    rng, gen = np.random.default_rng([seed, 0]), torch.Generator().manual_seed(int(seed))
    batch = min(k.batch_size, n_classes * int(np.bincount(yi, minlength=n_classes).min()))

    def train_loader(_datasets):  # a fresh class-balanced subset per member (DPE's random_subset)
        sub = class_balanced(yi, rng)
        return _loader(_Rows(X[sub], yi[sub], gi[sub], n_classes), batch, shuffle=True, generator=gen, drop_last=True)

    with _lean_and_seeded(core, seed):
        *_, ensemble = core._train_ensemble(
            init_model_func=partial(core._init_model, device="cpu", num_classes=n_classes, loss_name="isomax"),
            datasets={},
            dataloaders={"val": _loader(rows, _eval_batch(len(rows)))},
            init_train_loader=train_loader,
            cov_reg=cov_reg,
            random_subset=True,
            num_stages=k.n_members,
            full_model=_shelf(X.shape[1]),
            optim="sgd",
            alpha=k.alpha,
            eval_freq=-1,
            epochs=k.epochs,
            lr=k.lr,
            wd_weight=k.wd_weight,
            entropic=k.entropic,
            loss_name="isomax",
            scheduler="none",
            weight_decay=0.0,
            device="cpu",
        )
    protos = np.stack([p[:, 0].cpu().numpy() for p, _ in ensemble]).astype(np.float64)
    scales = np.array([float(s.reshape(-1)[0]) for _, s in ensemble])
    return protos, scales


def _predict_proba(protos: np.ndarray, scales: np.ndarray, X: np.ndarray) -> np.ndarray:
    """The ensemble's mean softmax on rows X (already standardised per sample), by dpe.core._predict."""
    import torch

    core = _core()
    n_classes = protos.shape[1]
    ensemble = [
        (torch.as_tensor(p[:, None], dtype=torch.float32), torch.as_tensor([s], dtype=torch.float32))
        for p, s in zip(protos, scales)
    ]
    rows = _Rows(X, np.zeros(len(X), np.int64), np.zeros(len(X), np.int64), n_classes)
    # the head's init (overwritten by each member) and the loader's base seed draw on torch's generator
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = core._init_model(num_classes=n_classes, model=_shelf(X.shape[1]), loss_name="isomax", device="cpu")
        logits = core._predict(ensemble, _loader(rows, _eval_batch(len(rows))), model, device="cpu")
    return logits.softmax(dim=2).mean(0).numpy()


def _missing() -> str | None:
    """Why the dpe retrainer cannot run here (dpe or netcal absent), or None."""
    if dpe_installed():
        return None
    return f"runs Diverse Prototypical Ensembles (dpe {DPE_VERSION}, with netcal), which is not installed: {INSTALL}"


@RETRAINERS.register("dpe", keys=DpeKeys, unavailable=_missing())
def fit_dpe(
    feats: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray,
    r,
    seed: int,
    score_groups: dict[str, np.ndarray] | None = None,
) -> DPEModel:
    """DPE without attribute labels on val features; `groups` choose each member's epoch and the cov_reg,
    never the training subsets. `r`: its keys and retrain.n_select_repeats (a `RetrainConfig`)."""
    check_inputs("DPE", feats, y, groups)
    if np.asarray(feats).shape[1] < 2:
        raise UserError(
            f"DPE needs features of at least 2 dimensions (they are standardised per sample); "
            f"got {np.asarray(feats).shape[1]}"
        )
    Z, mean, std = standardise(feats)
    X = per_sample(Z)
    classes, yi = np.unique(y, return_inverse=True)
    gi = np.unique(groups, return_inverse=True)[1]

    def fit_predict(a, b, cov_reg, fit_seed):
        protos, scales = train_ensemble(X[a], yi[a], gi[a], len(classes), r, cov_reg, fit_seed)
        return classes[_predict_proba(protos, scales, X[b]).argmax(1)]

    grid = list(r.cov_reg_grid)
    best, selection, halves, preds = select_on_halves(
        fit_predict, X, y, groups, grid, r.n_select_repeats, seed, score_groups
    )
    protos, scales = train_ensemble(
        X, yi, gi, len(classes), r, best, int(np.random.default_rng([seed, 2]).integers(2**31 - 1))
    )
    log.info(
        "DPE: %d members, cov_reg %g (held-out worst given-group acc %.3f)",
        len(protos),
        best,
        selection[best]["pseudo"],
    )
    return DPEModel(
        mean,
        std,
        protos,
        scales,
        classes,
        {"cov_reg": best},
        selection,
        halves,
        preds,
        extra={"dpe": DPE_VERSION, "members": int(len(protos))},
    )
