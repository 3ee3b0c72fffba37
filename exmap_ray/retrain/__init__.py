"""Group-robust retraining from (pseudo) group labels. DFR is the paper's choice."""
from .dfr import DFRModel, fit_dfr

__all__ = ["DFRModel", "fit_dfr"]
