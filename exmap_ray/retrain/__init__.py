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
`retrain.end_to_end` for a fine-tune) as one `RetrainConfig`. `fit` returns a `Head`: a linear head on
penultimate features with the label-free selection surface (`chosen`, `heldout`, `heldout_idx`,
`heldout_pred`). Evaluation reads any result,
last-layer or end-to-end, as a `RetrainedModel`: that surface plus `predictions(split)`, the labels
of every point of a split (`LastLayerResult` for a head, `end_to_end.EndToEndModel` for the cached
fine-tune). `groups` are any int ids; true groups are never needed, and every hyperparameter is
chosen on the worst *given*-group accuracy.
"""

from __future__ import annotations

from . import dfr, dpe, groupdro, jtt  # noqa: F401  (register; dpe only where the dpe extra is installed)
from .base import RETRAINERS, FunctionRetrainer, Head, LastLayerResult, RetrainedModel, Retrainer
from .common import LastLayerModel
from .config import RetrainConfig
from .dfr import DFRModel, DfrKeys, fit_dfr
from .groupdro import GroupDROKeys, fit_groupdro
from .jtt import JttKeys, error_set_from_groups, fit_jtt

__all__ = [
    "RETRAINERS",
    "Retrainer",
    "RetrainedModel",
    "Head",
    "LastLayerResult",
    "FunctionRetrainer",
    "DFRModel",
    "RetrainConfig",
    "DfrKeys",
    "GroupDROKeys",
    "JttKeys",
    "LastLayerModel",
    "fit_dfr",
    "fit_groupdro",
    "fit_jtt",
    "error_set_from_groups",
]
