"""The linear head every last-layer retrainer returns: standardised features in, class decisions out."""

from __future__ import annotations

import numpy as np


class LinearHead:
    """A linear classifier on standardised features: `mean`, `std`, `coef`, `intercept`, `classes`."""

    mean: np.ndarray
    std: np.ndarray
    coef: np.ndarray
    intercept: np.ndarray
    classes: np.ndarray

    def decision(self, feats: np.ndarray) -> np.ndarray:
        return ((feats - self.mean) / self.std) @ self.coef.T + self.intercept

    def predict(self, feats: np.ndarray) -> np.ndarray:
        d = self.decision(feats)
        idx = (d[:, 0] > 0).astype(int) if d.shape[1] == 1 else d.argmax(1)
        return self.classes[idx]
