"""Run inside a user+mount namespace whose DIR is a small tmpfs (see test_disk_full.py).

Fills DIR with a ballast file so that heatmap shards cannot all be written, extracts
heatmaps through the stage cache on a real local Ray, then frees the ballast and
extracts again. Prints one JSON line with what it observed.
"""

import json
import logging
import shutil
import sys
from pathlib import Path

import numpy as np
import ray
import torch

from exmap_ray.data import build_dataset
from exmap_ray.errors import UserError
from exmap_ray.heatmaps.extract import HeatmapShards, extract_with_actors
from exmap_ray.models import create_model, save_checkpoint
from exmap_ray.spec import from_dict
from exmap_ray.cache import StageCache

from tests.conftest import tiny_spec_dict

root = Path(sys.argv[1])
spec = from_dict(tiny_spec_dict(heatmaps={"shard_size": 50, "num_actors": 1, "downsize": 7}))
data = build_dataset(spec.dataset, spec.seed)
torch.manual_seed(0)
ckpt = Path(sys.argv[2]) / "model.pt"  # outside the tmpfs
save_checkpoint(create_model(spec.model.backbone, data.n_classes).eval(), ckpt)

cache = StageCache(root / "cache")
stage = cache.stage("heatmaps", {"test": "disk-full"})
ballast = root / "ballast"
free = shutil.disk_usage(root).free
with open(ballast, "wb") as f:  # leave room for about two of the six shards (each 50 x 3 x 7 x 7 float32)
    f.write(b"\0" * (free - 2 * 50 * 3 * 7 * 7 * 4 - 8192))

ray.init(num_cpus=2, logging_level=logging.WARNING, include_dashboard=False)
seen = {}
try:
    cache.run(stage, lambda d: extract_with_actors(spec, ckpt, len(data.val), d))
    seen["first"] = "no error"
except UserError as e:
    seen["first"] = f"{type(e).__name__}: {e}"
seen["after_fail"] = sorted(
    str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and ".locks" not in str(p) and p != ballast
)
seen["done_after_fail"] = stage.done
ballast.unlink()
info = cache.run(stage, lambda d: extract_with_actors(spec, ckpt, len(data.val), d))
seen["second_shards"] = info["shards"]
seen["second_n"] = len(HeatmapShards(stage.dir))
seen["second_finite"] = bool(np.isfinite(HeatmapShards(stage.dir).load()).all())
seen["records"] = [(r["stage"], r["event"]) for r in cache.records()]
ray.shutdown()
print("RESULT " + json.dumps(seen))
