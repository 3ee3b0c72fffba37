"""Heatmap methods (the registry `HEATMAP_METHODS`) and their sharded extraction.

A method is a class `Method(model, hspec)` whose instances map a batch of images to
`(relevance (B, C', H, W), predicted class (B,))`, explaining the predicted class (`explain` also gives
the features and logits of the same forward: method.py). Build it once per model; call it per batch.
`hspec` is the `heatmaps:` section; each method reads the keys every method takes and its own, declared
beside it (lrp.py's `LrpKeys`, gradients.py's `IntegratedGradientsKeys`). A new method is a class in its
module with `@HEATMAP_METHODS.register(NAME, keys=...)`, and that module's import here.
"""

from . import gradients, lrp  # noqa: F401  (register)
from .method import HEATMAP_METHODS

__all__ = ["HEATMAP_METHODS"]
