"""The retrainer contract (`Retrainer`, `Head`, `RetrainedModel`) and the registry, `RETRAINERS`.

A retrainer registers with `@RETRAINERS.register(NAME, keys=KeysDataclass, end_to_end=False)` on its fit
function, in its own module: the spec gets its section `retrain.<NAME>` from `keys`, and `end_to_end=True`
gives it the whole-network fine-tune (finetune.py) with its objective.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Protocol, runtime_checkable

import numpy as np

from ..registry import Registry
from .config import RetrainConfig


@runtime_checkable
class Head(Protocol):
    """What `Retrainer.fit` returns: a head on penultimate features, and how its value was chosen."""

    chosen: dict[str, Any]  # the selected hyperparameter(s), e.g. {"C": 0.1}
    heldout: dict[str, float]  # held-out worst accuracies there: "pseudo", "class", and any score_groups
    heldout_idx: np.ndarray  # (repeats, n/2) val indices of each held-out half
    heldout_pred: np.ndarray  # (repeats, n/2) the predictions there

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
    name: str  # its retrain.method name
    keys: type  # the dataclass of its section retrain.<name>: every key with default and reason
    section: str  # "retrain.<name>": where its keys sit in the spec
    modes: tuple[str, ...]  # "last_layer", and "end_to_end" where it can fine-tune the whole network

    def config(self, spec) -> RetrainConfig: ...

    def fit(
        self,
        feats: np.ndarray,
        y: np.ndarray,
        groups: np.ndarray,
        config,
        seed: int,
        score_groups: Optional[dict[str, np.ndarray]] = None,
    ) -> Head: ...

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


def _entry(name: str, fit: Callable, keys: Optional[type] = None, end_to_end: bool = False) -> FunctionRetrainer:
    return FunctionRetrainer(name, fit, keys, _end_to_end(name) if end_to_end else None)


RETRAINERS: Registry = Registry("retrainer", "retrain.method", entry=_entry)
