"""Sharded extraction over real Ray actors equals a single process, and reloads identically from disk."""
import numpy as np
import torch

from exmap_ray.data import build_dataset
from exmap_ray.heatmaps import HEATMAP_METHODS
from exmap_ray.heatmaps.extract import HeatmapStore, extract, extract_with_actors, shard_ranges
from exmap_ray.models import create_model, save_checkpoint
from exmap_ray.spec import from_dict

from .conftest import tiny_spec_dict


def test_shard_ranges_cover_everything_once():
    r = shard_ranges(1050, 100)
    assert r[0] == (0, 100) and r[-1] == (1000, 1050) and sum(b - a for a, b in r) == 1050


def test_actor_shards_equal_single_process_and_reload(ray_local, tmp_path):
    spec = from_dict(tiny_spec_dict(heatmaps={"shard_size": 70, "num_actors": 2, "downsize": 7}))
    data = build_dataset(spec.dataset, spec.seed)
    torch.manual_seed(0)
    model = create_model(spec.model.backbone, data.n_classes).eval()
    save_checkpoint(model, tmp_path / "model.pt")
    info = extract_with_actors(spec, tmp_path / "model.pt", len(data.val), tmp_path / "hm")
    assert info["shards"] == 5 and info["actors"] == 2

    method = HEATMAP_METHODS.get("lrp")(model, spec.heatmaps)
    maps, preds = extract(method, data.val.images, 64, 7)
    store = HeatmapStore(tmp_path / "hm")
    assert store.shape == (300, 3, 7, 7) == maps.shape
    np.testing.assert_allclose(store.load(), maps, rtol=1e-4, atol=1e-7)  # same maps, same order
    np.testing.assert_array_equal(store.preds(), preds)
    assert all(isinstance(a, np.memmap) for a in store.shards())
    assert not list((tmp_path / "hm").glob(".*tmp*"))  # no temp files left behind
