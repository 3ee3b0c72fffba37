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


def _write_store(folder, H, preds, dtype, shard_size=700):
    from exmap_ray.heatmaps.extract import write_index, write_shard

    entries = [write_shard(folder, i, a, b, H[a:b], preds[a:b], dtype)
               for i, (a, b) in enumerate(shard_ranges(len(H), shard_size))]
    write_index(folder, len(H), entries, dtype)
    return HeatmapStore(folder)


def test_float16_store_keeps_heatmaps_of_any_scale_and_the_pseudo_groups(tmp_path):
    """A float16 store halves the bytes; per-heatmap scales keep huge and tiny relevances in range, and
    the clusterer gets the same groups as from float32 (exact path, and the streamed shards)."""
    from exmap_ray import clustering
    from exmap_ray.clustering_scale import planted_heatmaps

    H, planted = planted_heatmaps(2000, seed=3)
    H[:500] *= 1e6   # beyond float16's largest value (65504) unless scaled
    H[500:1000] *= 1e-9  # below its smallest subnormal (6e-8) unless scaled
    H[1000] = 0  # an all-zero heatmap stays zero (its scale is 1, not 0)
    preds = planted // 2
    s32 = _write_store(tmp_path / "f32", H, preds, "float32")
    s16 = _write_store(tmp_path / "f16", H, preds, "float16")
    assert s16.dtype == "float16" and s32.dtype == "float32"
    b32 = sum(p.stat().st_size for p in (tmp_path / "f32").glob("shard-*"))
    b16 = sum(p.stat().st_size for p in (tmp_path / "f16").glob("shard-*"))
    assert b16 < 0.51 * b32
    back = s16.load()
    assert back.dtype == np.float32 and np.isfinite(back).all() and not back[1000].any()
    # float16 keeps 11 significant bits: each value within 2^-11 of its heatmap's max |value|
    peak = np.abs(H.reshape(len(H), -1)).max(1).reshape(-1, 1, 1, 1)
    assert (np.abs(back - H) <= peak * 2.0 ** -11).all()
    np.testing.assert_allclose(s16[7], back[7])  # one heatmap (plots) = the same as the whole load
    np.testing.assert_array_equal(s16.preds(), preds)

    cs = from_dict({"clustering": {"method": "spectral", "k": "auto", "scope": "global"}}).clustering
    ref, info = clustering.pseudo_groups(s32.load(), preds, cs, seed=0)
    for given in (s16.for_clustering(whole_below=10**9), s16.for_clustering(whole_below=0, normalized=True)):
        labels, info16 = clustering.pseudo_groups(given, preds, cs, seed=0)
        np.testing.assert_array_equal(labels, ref)
        assert info16["scopes"]["global"]["k"] == info["scopes"]["global"]["k"]
    # the streamed shards are the stored float16 rows, memory-mapped, each already divided by its max |value|
    shards = s16.for_clustering(whole_below=0, normalized=True)
    assert all(isinstance(a, np.memmap) and a.dtype == np.float16 for a in shards)
    assert np.abs(np.asarray(shards[0], np.float32)).reshape(700, -1).max(1)[:5].tolist() == [1.0] * 5
