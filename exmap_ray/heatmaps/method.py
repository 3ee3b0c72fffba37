"""What a heatmap method gives besides its maps: the features and logits of the same forward pass.

    e = method.explain(x)     # Explained(relevance, pred, features, logits), all from one forward
    rel, pred = method(x)     # the maps and the explained class only

The heatmaps stage keeps the penultimate features and logits of val from the forward that its
heatmaps come from, so val is read and forwarded once (the features stage does test only).
Features are what `models.embed` computes: `forward_head(forward_features(x), pre_logits=True)`,
and the logits are the classifier applied to them. Each method takes them from its own forward:
input x gradient and Grad-CAM from the forward they differentiate, integrated gradients from the
forward of the real input (the one that picks the explained class, not the interpolants), LRP from
its BatchNorm-folded, rule-wrapped copy of the model (the input of its classifier): equal to the
plain model's to float rounding in fp32.

Under bf16 autocast (`heatmaps.precision` bf16, or auto on CUDA) they are those of the bf16
forward, cast to fp32: about 3 significant digits. The features stage embeds test in the same
precision (`heatmaps.precision`, stages.features_task), so val and test features are of one kind:
both fp32, or both a bf16 forward's (LRP's wrapped convolutions then give each output rounded once,
as a plain bf16 convolution does: heatmaps/lrp.py).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import nn

from ..models import autocast, penultimate
from ..registry import Registry

HEATMAP_METHODS: Registry = Registry("heatmap method", "heatmaps.method")
"""name -> a `HeatmapMethod` class, `Method(model, hspec)`; registered with
`@HEATMAP_METHODS.register(NAME, keys=...)` beside the class, its own keys in that dataclass."""


class Explained(NamedTuple):
    relevance: torch.Tensor  # (B, C', H, W): the explanation of `pred`
    pred: torch.Tensor  # (B,): the explained (predicted) class
    features: Optional[torch.Tensor]  # (B, d) fp32: penultimate features of the same forward (None: not a timm model)
    logits: torch.Tensor  # (B, n_classes) fp32: the classifier's output on them


class HeatmapMethod:
    """Base of the registered methods: `explain(x)` does the work; calling gives (relevance, pred)."""

    def explain(self, x: torch.Tensor) -> Explained:
        raise NotImplementedError

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        e = self.explain(x)
        return e.relevance, e.pred


def is_timm(model: nn.Module) -> bool:
    """A model with timm's split into features, head and classifier (every model the pipeline builds)."""
    return all(callable(getattr(model, a, None)) for a in ("forward_features", "forward_head", "get_classifier"))


def forward_split(model: nn.Module, x: torch.Tensor) -> tuple[Optional[torch.Tensor], torch.Tensor]:
    """(penultimate features, logits) as `models.embed` computes them; gradients flow through both.
    Any other model (the property tests' small nets): (None, model(x))."""
    if not is_timm(model):
        return None, model(x)
    f = penultimate(model, x)
    return f, model.get_classifier()(f)


def classifier_name(model: nn.Module) -> str:
    """The qualified name of a timm model's classifier module (`get_classifier()`), e.g. 'fc'."""
    clf = model.get_classifier()
    for name, m in model.named_modules():
        if m is clf and name:
            return name
    from ..errors import UserError

    raise UserError(
        f"model '{type(model).__name__}' has no classifier module among its submodules "
        f"(get_classifier() gives {type(clf).__name__}); the heatmaps stage needs one to keep the "
        f"val features of its forward"
    )


class _PlainForward:
    """A method without `explain` (a plugin's): its maps, and the features and logits of a plain forward."""

    def __init__(self, method, model: nn.Module, precision: str):
        self.method, self.model, self.precision = method, model, precision

    def explain(self, x: torch.Tensor) -> Explained:
        rel, pred = self.method(x)
        with torch.no_grad(), autocast(x.device.type, self.precision):
            f, logits = forward_split(self.model, x)
        return Explained(rel, pred, as_fp32(f), logits.float())


def as_fp32(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.detach().float()


def with_features(method, model: nn.Module, precision: str = "auto"):
    """`method` if it explains with features (every registered one), else it plus a second, plain forward."""
    return method if callable(getattr(method, "explain", None)) else _PlainForward(method, model, precision)
