"""exmap-ray: ExMap (Chakraborty, Sletten & Kampffmeyer, CVPR 2024) as a Ray experiment engine.

exmap-ray run cmnist
"""

import logging as _logging
import os as _os

__version__ = "0.1.0"
QUIET_ENV = "EXMAP_RAY_QUIET"  # set by `--quiet`; reaches every Ray worker through the job's runtime env


def quiet_worker_logs() -> None:
    """In a Ray worker of a `--quiet` command: only warnings reach the console.

    Called where each worker starts (ERM's train loop, heatmap actors, Tune trials), after Ray has set
    up its loggers there. Only the console handlers are raised to WARNING: Ray Train's log files under
    the session's logs/ folder keep their INFO lines.
    """
    if _os.environ.get(QUIET_ENV) != "1":
        return
    for name in (None, "ray", "ray.train", "ray.tune"):
        for h in _logging.getLogger(name).handlers:
            if isinstance(h, _logging.StreamHandler) and not isinstance(h, _logging.FileHandler):
                h.setLevel(max(h.level, _logging.WARNING))


# FAISS's loader logs an AVX2 probe (which may fail and fall back) and "Successfully loaded faiss" at
# INFO; in every Ray worker that imports the clustering module those lines reach the console. A level
# the user set on the "faiss" logger is kept.
if _logging.getLogger("faiss").level == _logging.NOTSET:
    _logging.getLogger("faiss").setLevel(_logging.WARNING)
