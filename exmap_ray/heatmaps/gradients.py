"""Gradient-based heatmaps: input x gradient, integrated gradients and Grad-CAM.

All explain the predicted class, like LRP. Input x gradient and integrated
gradients keep sign and input channels; for a bias-free ReLU network input x
gradient sums to the logit (Euler), and integrated gradients sums to
f(x) - f(baseline) up to the Riemann error of `heatmaps.ig_steps` steps
(completeness). Grad-CAM uses the last feature map of timm's
`forward_features` (the last convolutional stage for CNNs) and is upsampled to
the input size, so every method gives (B, C', H, W) maps; with a global-average
pool and linear head it equals CAM (the classifier-weighted feature map).

`heatmaps.precision` puts the forward passes under bf16 autocast ('auto': on CUDA
only); the maps come back in fp32.

Each method's `explain(x)` also returns the penultimate features and logits of its
forward (method.py): the heatmaps stage keeps them, so val is forwarded once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..models import autocast
from ..options import opt, positive
from .method import HEATMAP_METHODS, Explained, HeatmapMethod, as_fp32, forward_split


@dataclass
class IntegratedGradientsKeys:
    ig_steps: int = opt(
        32,
        "integrated gradients: gradient evaluations along the path from the all-zero "
        "baseline (midpoint rule); the completeness error shrinks as 1/steps",
        positive,
    )


IG_IMAGES_PER_PASS = 256  # integrated gradients batches path points up to this many images per forward


def _predicted_seed(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    pred = logits.argmax(1)
    return pred, torch.zeros_like(logits).scatter_(1, pred[:, None], 1.0)  # one-hot, no range check (a GPU sync)


@HEATMAP_METHODS.register("input_x_gradient")
class InputXGradient(HeatmapMethod):
    """x * d logit_pred / dx: signed, one map per input channel."""

    def __init__(self, model: nn.Module, hspec):
        self.model = model.eval()
        self.precision = hspec.precision

    def explain(self, x: torch.Tensor) -> Explained:
        x = x.detach().requires_grad_(True)
        with autocast(x.device.type, self.precision):
            feats, logits = forward_split(self.model, x)
        pred, seed = _predicted_seed(logits)
        (g,) = torch.autograd.grad(logits, x, seed)
        return Explained((x * g).detach().float(), pred.detach(), as_fp32(feats), logits.detach().float())


@HEATMAP_METHODS.register("gradcam")
class GradCAM(HeatmapMethod):
    """ReLU(sum_c mean_hw(dlogit/dA_c) * A_c) on the last feature map, upsampled: one channel, >= 0."""

    def __init__(self, model: nn.Module, hspec):
        self.model = model.eval()
        self.precision = hspec.precision

    def explain(self, x: torch.Tensor) -> Explained:
        with autocast(x.device.type, self.precision):
            return self._cam(x)

    def _cam(self, x: torch.Tensor):
        feats = self.model.forward_features(x.detach())
        if feats.dim() != 4:
            from ..errors import UserError

            raise UserError(
                f"heatmaps.method 'gradcam' needs a 4-D feature map (B, C, H, W) from "
                f"forward_features; '{type(self.model).__name__}' gives shape {tuple(feats.shape)}"
            )
        feats.retain_grad()
        pooled = self.model.forward_head(feats, pre_logits=True)  # the penultimate features
        logits = self.model.get_classifier()(pooled)
        pred, seed = _predicted_seed(logits)
        (g,) = torch.autograd.grad(logits, feats, seed)
        cam = F.relu((g.float().mean((2, 3), keepdim=True) * feats.float()).sum(1, keepdim=True))
        cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return Explained(cam.detach(), pred.detach(), pooled.detach().float(), logits.detach().float())


@HEATMAP_METHODS.register("integrated_gradients", keys=IntegratedGradientsKeys)
class IntegratedGradients(HeatmapMethod):
    """(x - x0) * mean over the straight path x0 -> x of d logit_pred / dx (Sundararajan et al. 2017).

    The baseline x0 is all zeros (in the model's input space, i.e. after normalisation). The
    path integral uses the midpoint rule with `hspec.ig_steps` gradient evaluations per image
    (path points are stacked up to IG_IMAGES_PER_PASS images per forward/backward), so the cost
    is about `ig_steps` times input x gradient's. Models must be in eval mode (BatchNorm on
    running statistics), as they are here, so stacking does not mix images. The target is the
    class predicted at x (not at the interpolants). Signed, one map per input channel.
    Works with any differentiable model. The features and logits come from that forward of x.
    """

    def __init__(self, model: nn.Module, hspec):
        self.model = model.eval()
        self.steps = int(hspec.ig_steps)
        self.precision = hspec.precision

    def explain(self, x: torch.Tensor) -> Explained:
        with autocast(x.device.type, self.precision):
            return self._ig(x.detach())

    def _ig(self, x: torch.Tensor):
        baseline = torch.zeros_like(x)
        with torch.no_grad():
            feats, logits = forward_split(self.model, x)
            pred, seed = _predicted_seed(logits)
        alphas = (torch.arange(self.steps, dtype=x.dtype, device=x.device) + 0.5) / self.steps
        per_pass = max(1, IG_IMAGES_PER_PASS // len(x))  # several path points per forward for small batches
        total = torch.zeros_like(x)
        for chunk in alphas.split(per_pass):
            a = chunk.view(-1, *([1] * x.dim()))
            xi = (baseline + a * (x - baseline)).reshape(-1, *x.shape[1:]).requires_grad_(True)
            (g,) = torch.autograd.grad(self.model(xi), xi, seed.repeat(len(chunk), 1))
            total += g.float().view(len(chunk), *x.shape).sum(0)
        return Explained(((x - baseline) * total / self.steps).detach(), pred.detach(), as_fp32(feats), logits.float())
