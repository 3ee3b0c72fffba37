"""How long Ray Train takes to reach a training loop that does nothing: the floor under the ERM stage's start-up.

    RAY_AUTH_MODE=disabled .venv/bin/python benchmarks/studies/ray_train_startup.py

Starts a local Ray (timed), then runs TorchTrainer (1 CPU worker, the same Ray Train settings the CLI
sets for a local Ray: LOCAL_RAY_ENV) twice: a loop that only writes the time it started, and one that
also imports torch and timm (what the ERM worker imports before it builds its data and model). Prints
fit()'s wall time and the time from fit() to the loop's first line.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

STAMP = Path(tempfile.mkdtemp()) / "loop_started"


def noop(config):
    STAMP.write_text(f"{time.time()} {time.time()}")


def imports(config):
    t = time.time()
    import timm  # noqa: F401
    import torch  # noqa: F401

    STAMP.write_text(f"{t} {time.time()}")


def main() -> None:
    from exmap_ray.cli import LOCAL_RAY_ENV

    os.environ.update(LOCAL_RAY_ENV)
    t0 = time.perf_counter()
    import ray

    ray.init(logging_level="ERROR", log_to_driver=False)
    print(f"load average {os.getloadavg()[0]:.1f}; import ray + ray.init: {time.perf_counter() - t0:.1f} s")
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    for name, fn in (("a loop that does nothing", noop), ("a loop that imports torch and timm", imports)):
        start, t = time.time(), time.perf_counter()
        TorchTrainer(
            fn, scaling_config=ScalingConfig(num_workers=1), run_config=RunConfig(storage_path=tempfile.mkdtemp())
        ).fit()
        began, done = map(float, STAMP.read_text().split())
        print(
            f"{name}: fit() {time.perf_counter() - t:.1f} s, fit() to the loop's first line {began - start:.1f} s, "
            f"the loop's imports {done - began:.1f} s"
        )
    ray.shutdown()


if __name__ == "__main__":
    main()
