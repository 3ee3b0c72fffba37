"""Group-robust retraining from any (pseudo) group labels, selectable by `retrain.method`. DFR is the paper's.

    from exmap_ray.retrain import RETRAINERS
    r = RETRAINERS.get(spec.retrain.method)
    head = r.fit(val_features, y_val, groups, spec, seed)          # retrain.mode: last_layer
    pred = head.predict(test_features)
    res = r.finetune(model, val_images, y_val, groups, spec, seed)  # retrain.mode: end_to_end
    pred = res.predict(test_images)

A `Retrainer` has `fit(feats, y, groups, spec, seed, score_groups=None)`, which returns a model with
`.predict(features) -> labels` and DFR's held-out selection surface (`DFRModel` or
`common.LastLayerModel`: `selection`, `heldout`, `heldout_idx`, `heldout_pred`, `chosen`), and
`finetune(model, images, y, groups, spec, seed, max_steps=None)`, a `finetune.FinetuneResult` whose
`.predict(images)` gives labels, or None where the method is last-layer only (DFR). `spec` is the
full `Spec`: DFR reads `spec.dfr`, the others `spec.retrain`. `groups` are any int ids; true groups
are never needed, and every hyperparameter is chosen on the worst *given*-group accuracy.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from ..registry import Registry
from .common import LastLayerModel
from .dfr import DFRModel, fit_dfr
from .groupdro import fit_groupdro
from .jtt import error_set_from_groups, fit_jtt


@dataclass(frozen=True)
class Retrainer:
    fit: Callable                       # (feats, y, groups, spec, seed, score_groups=None) -> model with .predict
    finetune: Optional[Callable] = None  # (model, images, y, groups, spec, seed, max_steps=None) -> FinetuneResult

    @property
    def modes(self) -> tuple[str, ...]:
        return ("last_layer", "end_to_end") if self.finetune else ("last_layer",)


def _dfr(feats, y, groups, spec, seed, score_groups=None) -> DFRModel:
    return fit_dfr(feats, y, groups, spec.dfr, seed, score_groups=score_groups)


def _end_to_end(method: str) -> Callable:
    def run(model, images, y, groups, spec, seed, max_steps=None, device="cpu"):
        from .finetune import finetune_from_spec  # torch only when asked for

        return finetune_from_spec(method, model, images, y, groups, spec, seed, max_steps=max_steps, device=device)
    return run


RETRAINERS: Registry = Registry("retrainer", "retrain.method")
RETRAINERS.register("dfr")(Retrainer(_dfr))
RETRAINERS.register("groupdro")(Retrainer(fit_groupdro, _end_to_end("groupdro")))
RETRAINERS.register("jtt")(Retrainer(fit_jtt, _end_to_end("jtt")))

__all__ = ["RETRAINERS", "Retrainer", "DFRModel", "LastLayerModel", "fit_dfr", "fit_groupdro", "fit_jtt",
           "error_set_from_groups"]
