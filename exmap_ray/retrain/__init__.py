"""Group-robust retraining from any (pseudo) group labels, selectable by `retrain.method`. DFR is the paper's.

    from exmap_ray.retrain import RETRAINERS, LastLayerResult
    r = RETRAINERS.get(spec.retrain.method)
    head = r.fit(val_features, y_val, groups, r.config(spec), seed)          # retrain.mode: last_layer
    model = LastLayerResult(head, {"val": val_features, "test": test_features})
    pred = model.predictions("test")
    res = r.finetune(net, val_images, y_val, groups, r.config(spec), seed)   # retrain.mode: end_to_end
    pred = res.predict(test_images)

The contract is `Retrainer` (a typing.Protocol). Each retrainer owns one spec section,
`retrain.<name>` (its `section`): the dataclass `keys` declares its keys beside its code (defaults,
reasons, checks, default search ranges), and the spec makes the section from it. `config(spec)` hands
it that section with the keys every retrainer shares (`retrain.n_select_repeats`, and
`retrain.end_to_end` for a fine-tune) as one `RetrainConfig`. `fit` returns a `Head`: a linear head on penultimate features with the label-free
selection surface (`chosen`, `heldout`, `heldout_idx`, `heldout_pred`). Evaluation reads any result,
last-layer or end-to-end, as a `RetrainedModel`: that surface plus `predictions(split)`, the labels
of every point of a split (`LastLayerResult` for a head, `end_to_end.EndToEndModel` for the cached
fine-tune). `groups` are any int ids; true groups are never needed, and every hyperparameter is
chosen on the worst *given*-group accuracy.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Protocol, runtime_checkable

import numpy as np

from ..registry import Registry
from .common import LastLayerModel
from .config import RetrainConfig
from .dfr import DFRModel, DfrKeys, fit_dfr
from .groupdro import GroupDROKeys, fit_groupdro
from .jtt import JttKeys, error_set_from_groups, fit_jtt


@runtime_checkable
class Head(Protocol):
    """What `Retrainer.fit` returns: a head on penultimate features, and how its value was chosen."""

    chosen: dict[str, Any]       # the selected hyperparameter(s), e.g. {"C": 0.1}
    heldout: dict[str, float]    # held-out worst accuracies there: "pseudo", "class", and any score_groups
    heldout_idx: np.ndarray      # (repeats, n/2) val indices of each held-out half
    heldout_pred: np.ndarray     # (repeats, n/2) the predictions there

    def predict(self, feats: np.ndarray) -> np.ndarray: ...


@runtime_checkable
class RetrainedModel(Protocol):
    """A retrained model as evaluation reads it, last-layer or end-to-end: its labels per split."""

    chosen: dict[str, Any]
    heldout: dict[str, float]
    heldout_idx: np.ndarray
    heldout_pred: np.ndarray

    def predictions(self, split: str) -> np.ndarray: ...


@runtime_checkable
class Retrainer(Protocol):
    name: str                    # its retrain.method name
    keys: type                   # the dataclass of its section retrain.<name>: every key with default and reason
    section: str                 # "retrain.<name>": where its keys sit in the spec
    modes: tuple[str, ...]       # "last_layer", and "end_to_end" where it can fine-tune the whole network

    def config(self, spec) -> RetrainConfig: ...

    def fit(self, feats: np.ndarray, y: np.ndarray, groups: np.ndarray, config, seed: int,
            score_groups: Optional[dict[str, np.ndarray]] = None) -> Head: ...

    # end_to_end only: (model, images, y, groups, config, seed, max_steps=None, device="cpu") -> FinetuneResult
    finetune: Optional[Callable]


@dataclass(frozen=True)
class LastLayerResult:
    """A fitted head and the penultimate features of each split it predicts (a `RetrainedModel`)."""

    head: Head
    features: Mapping[str, np.ndarray]  # split name -> (N, d) features

    @property
    def chosen(self) -> dict:
        return self.head.chosen

    @property
    def heldout(self) -> dict:
        return self.head.heldout

    @property
    def heldout_idx(self) -> np.ndarray:
        return self.head.heldout_idx

    @property
    def heldout_pred(self) -> np.ndarray:
        return self.head.heldout_pred

    def predictions(self, split: str) -> np.ndarray:
        return self.head.predict(self.features[split])


@dataclass(frozen=True)
class FunctionRetrainer:
    """A `Retrainer` made of functions: `fit`, and `finetune` where the method has an end-to-end mode."""

    name: str
    fit: Callable
    keys: type
    finetune: Optional[Callable] = None

    @property
    def section(self) -> str:
        return f"retrain.{self.name}"

    @property
    def modes(self) -> tuple[str, ...]:
        return ("last_layer", "end_to_end") if self.finetune else ("last_layer",)

    def config(self, spec) -> RetrainConfig:
        r = spec.retrain
        return RetrainConfig(getattr(r, self.name), r.n_select_repeats, r.end_to_end)


def _end_to_end(method: str) -> Callable:
    def run(model, images, y, groups, config, seed, max_steps=None, device="cpu"):
        from .finetune import finetune_with  # torch only when asked for

        return finetune_with(method, model, images, y, groups, config, seed, max_steps=max_steps, device=device)
    return run


RETRAINERS: Registry = Registry("retrainer", "retrain.method")


def register_retrainer(retrainer: FunctionRetrainer) -> FunctionRetrainer:
    """Register a retrainer under its name; the spec then has its section retrain.<name>."""
    return RETRAINERS.register(retrainer.name)(retrainer)


register_retrainer(FunctionRetrainer("dfr", fit_dfr, DfrKeys))
register_retrainer(FunctionRetrainer("groupdro", fit_groupdro, GroupDROKeys, _end_to_end("groupdro")))
register_retrainer(FunctionRetrainer("jtt", fit_jtt, JttKeys, _end_to_end("jtt")))

__all__ = ["RETRAINERS", "Retrainer", "RetrainedModel", "Head", "LastLayerResult", "FunctionRetrainer", "DFRModel",
           "RetrainConfig", "DfrKeys", "GroupDROKeys", "JttKeys", "register_retrainer",
           "LastLayerModel", "fit_dfr", "fit_groupdro", "fit_jtt", "error_set_from_groups"]
