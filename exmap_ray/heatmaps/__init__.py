"""Heatmap methods (a registry) and their sharded extraction.

A method is a class `Method(model, hspec)` whose instances map a batch of
images to `(relevance (B, C', H, W), predicted class (B,))`, explaining the
predicted class. Build it once per model; call it per batch. `hspec` is a
`spec.HeatmapSpec`; each method reads only its own keys (LRP: conv_rule, alpha,
beta, gamma, epsilon, canonize; integrated gradients: ig_steps).
"""
from ..registry import Registry
from .gradients import GradCAM, InputXGradient, IntegratedGradients
from .lrp import LRP

HEATMAP_METHODS: Registry = Registry("heatmap method", "heatmaps.method")
HEATMAP_METHODS.register("lrp")(LRP)
HEATMAP_METHODS.register("input_x_gradient")(InputXGradient)
HEATMAP_METHODS.register("integrated_gradients")(IntegratedGradients)
HEATMAP_METHODS.register("gradcam")(GradCAM)

__all__ = ["HEATMAP_METHODS"]
