"""The fixed cost of one Ray Train ERM fit: three fits of the tests' tiny spec in one local Ray session.

    python benchmarks/ray_train_overhead.py                  # Ray Train's own defaults
    python benchmarks/ray_train_overhead.py --local-defaults # what exmap-ray sets for a Ray it starts locally

The tiny spec trains 1 epoch on 400 images (well under a second of compute), so the times are
almost all start-up and polling: controller and worker actors, process group, checkpoint report.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.conftest: the tiny spec


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--local-defaults", action="store_true", help="apply exmap_ray.cli.LOCAL_RAY_ENV first")
    ap.add_argument("--fits", type=int, default=3)
    args = ap.parse_args()
    import ray

    from exmap_ray.cli import LOCAL_RAY_ENV, local_ray_defaults
    from exmap_ray.erm import train_erm
    from exmap_ray.spec import from_dict
    from tests.conftest import tiny_spec_dict

    if args.local_defaults:
        local_ray_defaults()
    ray.init(logging_level=logging.WARNING)
    spec = from_dict(tiny_spec_dict())
    times = []
    for _ in range(args.fits):
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            train_erm(spec, Path(d), 2)
            times.append(time.perf_counter() - t0)
    ray.shutdown()
    env = {k: v for k, v in LOCAL_RAY_ENV.items()} if args.local_defaults else "Ray's defaults"
    print(f"tiny ERM fit (Ray Train, 1 CPU worker), {env}: " + ", ".join(f"{t:.1f} s" for t in times))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
