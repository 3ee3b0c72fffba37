"""Gradient-based heatmaps: input x gradient and Grad-CAM.

Both explain the predicted class, like LRP. Grad-CAM uses the last feature
map of timm's `forward_features` (the last convolutional stage for CNNs) and
is upsampled to the input size, so every method gives (B, C', H, W) maps.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _predicted_seed(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    pred = logits.argmax(1)
    return pred, F.one_hot(pred, logits.shape[1]).to(logits.dtype)


class InputXGradient:
    """x * d logit_pred / dx: signed, one map per input channel."""

    def __init__(self, model: nn.Module, hspec):
        self.model = model.eval()

    def __call__(self, x: torch.Tensor):
        x = x.detach().requires_grad_(True)
        logits = self.model(x)
        pred, seed = _predicted_seed(logits)
        (g,) = torch.autograd.grad(logits, x, seed)
        return (x * g).detach(), pred.detach()


class GradCAM:
    """ReLU(sum_c mean_hw(dlogit/dA_c) * A_c) on the last feature map, upsampled: one channel, >= 0."""

    def __init__(self, model: nn.Module, hspec):
        self.model = model.eval()

    def __call__(self, x: torch.Tensor):
        feats = self.model.forward_features(x.detach())
        if feats.dim() != 4:
            from ..errors import UserError
            raise UserError(f"heatmaps.method 'gradcam' needs a 4-D feature map (B, C, H, W) from "
                            f"forward_features; '{type(self.model).__name__}' gives shape {tuple(feats.shape)}")
        feats.retain_grad()
        logits = self.model.forward_head(feats)
        pred, seed = _predicted_seed(logits)
        (g,) = torch.autograd.grad(logits, feats, seed)
        cam = F.relu((g.mean((2, 3), keepdim=True) * feats).sum(1, keepdim=True))
        cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return cam.detach(), pred.detach()
