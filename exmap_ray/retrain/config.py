"""What `Retrainer.config(spec)` hands a retrainer: its own section and the keys all retrainers share.

    cfg = RetrainConfig(DfrKeys(c_grid=[1.0, 0.1]), n_select_repeats=3)
    cfg.c_grid, cfg.n_select_repeats          # its own keys and the shared ones, read alike

A retrainer's own keys are its section `retrain.<name>` (the dataclass it registers as `keys`);
`retrain.n_select_repeats` and `retrain.end_to_end` (the fine-tune of `retrain.mode: end_to_end`)
are shared by every retrainer and sit beside it here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RetrainConfig:
    own: Any  # the retrainer's section, retrain.<name>
    n_select_repeats: int = 5  # retrain.n_select_repeats
    end_to_end: Any = None  # retrain.end_to_end (EndToEndSpec), for an end-to-end fine-tune

    def __getattr__(self, name: str):  # called only for names not above: the retrainer's own keys
        if name.startswith("__") or name == "own":
            raise AttributeError(name)
        return getattr(self.own, name)
