"""Sharded extraction over real Ray actors equals a single process, and reloads identically from disk;
the val features and logits the actors keep from the same forward equal `models.embed`'s."""

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from exmap_ray.data import build_dataset
from exmap_ray.errors import DataError
from exmap_ray.heatmaps import HEATMAP_METHODS
from exmap_ray.heatmaps.extract import HeatmapShards, extract, extract_with_actors, shard_ranges
from exmap_ray.models import create_model, embed, load_checkpoint, save_checkpoint
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
    maps, preds, _, _ = extract(method, data.val.images, 64, 7)
    store = HeatmapShards(tmp_path / "hm")
    assert store.shape == (300, 3, 7, 7) == maps.shape
    np.testing.assert_allclose(store.load(), maps, rtol=1e-4, atol=1e-7)  # same maps, same order
    np.testing.assert_array_equal(store.preds(), preds)
    assert all(isinstance(a, np.memmap) for a in store.shards())
    assert not list((tmp_path / "hm").glob(".*tmp*"))  # no temp files left behind
    assert store.has_features and store.features().shape == (300, model.num_features)


def _folding_matters(model: nn.Module) -> nn.Module:
    """BatchNorm statistics away from (0, 1), so that LRP's folded copy really differs from the model."""
    g = torch.Generator().manual_seed(1)
    for bn in model.modules():
        if isinstance(bn, nn.BatchNorm2d):
            n = bn.num_features
            bn.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            bn.running_var.copy_(0.2 + 1.8 * torch.rand(n, generator=g))
            bn.weight.data.copy_(0.5 + torch.rand(n, generator=g))
            bn.bias.data.copy_(torch.rand(n, generator=g) - 0.5)
    return model.eval()


@pytest.mark.parametrize("method", HEATMAP_METHODS.names())
def test_one_pass_features_and_logits_equal_embed(ray_local, tmp_path, method):
    """Every method: the val features and logits the actors write beside their heatmaps equal a plain
    forward's (models.embed, what the features stage computed for val before) to fp32 rounding.

    LRP goes through the actor pool; the other methods run the same actor class in this process (each
    actor is a process importing torch and timm, far longer than its 300 images take; the pool itself
    is tested above and in tests/faults/test_kill_workers.py)."""
    from exmap_ray.heatmaps.extract import HeatmapWorker, write_index

    spec = from_dict(
        tiny_spec_dict(
            heatmaps={"method": method, "shard_size": 120, "num_actors": 1, "precision": "fp32", "ig_steps": 4}
        )
    )
    data = build_dataset(spec.dataset, spec.seed)
    torch.manual_seed(0)
    save_checkpoint(_folding_matters(create_model(spec.model.backbone, data.n_classes)), tmp_path / "model.pt")
    if method == "lrp":
        info = extract_with_actors(spec, tmp_path / "model.pt", len(data.val), tmp_path / "hm")
    else:
        (tmp_path / "hm").mkdir()
        worker = HeatmapWorker(spec.to_dict(), str(tmp_path / "model.pt"), str(tmp_path / "hm"), threads=1)
        entries = [worker.run(i, a, b) for i, (a, b) in enumerate(shard_ranges(len(data.val), 120))]
        write_index(tmp_path / "hm", len(data.val), entries)
        info = {"bytes_written": sum(e["bytes"] for e in entries)}
    store = HeatmapShards(tmp_path / "hm")
    model = load_checkpoint(spec.model.backbone, data.n_classes, tmp_path / "model.pt")  # as the actors read it
    want_f, want_l = embed(model, data.val.images, precision="fp32")
    f, logits = store.features(), store.logits()
    assert f.dtype == logits.dtype == np.float32 and f.shape == want_f.shape and logits.shape == want_l.shape
    # LRP's forward runs BatchNorm folded into the convolutions, and P + N apart: rounding, nothing more
    np.testing.assert_allclose(f, want_f, rtol=0, atol=1e-5 * np.abs(want_f).max())
    np.testing.assert_allclose(logits, want_l, rtol=0, atol=1e-5 * np.abs(want_l).max())
    np.testing.assert_array_equal(store.preds(), logits.argmax(1))  # the explained class is that forward's
    assert info["bytes_written"] == sum(np.load(p).nbytes for p in (tmp_path / "hm").glob("*-*.npy"))


def test_a_store_without_features_is_refused_by_name(tmp_path):
    """A heatmap folder of the old layout (no features beside the shards) is never read as half a stage."""
    from exmap_ray.heatmaps.extract import write_index, write_shard

    H = np.random.default_rng(0).normal(size=(10, 1, 2, 2)).astype(np.float32)
    write_index(tmp_path, 10, [write_shard(tmp_path, 0, 0, 10, H, np.zeros(10, np.int64))])
    store = HeatmapShards(tmp_path)
    assert not store.has_features and store.load().shape == H.shape
    with pytest.raises(DataError, match="holds no val features: it was written before"):
        store.features()
    with pytest.raises(ValueError, match="features and logits must both be given"):
        write_shard(tmp_path / "x", 0, 0, 10, H, np.zeros(10, np.int64), features=np.zeros((10, 3)))


def test_the_pipeline_result_is_that_of_embeds_val_features(tiny_run):
    """The tiny run (val features from the LRP actors' forward) gives the same table as with the val
    features and logits of a plain forward (models.embed, as the features stage computed them before)."""
    from exmap_ray.pipeline import evaluate_all
    from exmap_ray.resources import resolve_resources
    from exmap_ray.stages import Timer, compute_upstream
    from exmap_ray.cache import StageCache

    out, res = tiny_run
    spec = resolve_resources(from_dict(tiny_spec_dict()))
    data = build_dataset(spec.dataset, spec.seed)
    up = compute_upstream(spec, data, StageCache(out / "cache"))  # every stage reused
    model = load_checkpoint(spec.model.backbone, data.n_classes, up.stages["erm"].dir / "model.pt")
    f, logits = embed(model, data.val.images, precision="fp32")
    np.testing.assert_allclose(up.val_features, f, rtol=0, atol=1e-5 * np.abs(f).max())
    np.testing.assert_allclose(up.val_logits, logits, rtol=0, atol=1e-5 * np.abs(logits).max())
    again, _ = evaluate_all(spec, data, dataclasses.replace(up, val_features=f, val_logits=logits), Timer())
    for row in ("erm", "robust", "oracle_dfr"):
        assert again[row]["test"] == res[row]["test"], row
    assert again["erm"]["val_acc"] == res["erm"]["val_acc"] and again["robust"]["val"] == res["robust"]["val"]


def _write_store(folder, H, preds, dtype, shard_size=700):
    from exmap_ray.heatmaps.extract import write_index, write_shard

    entries = [
        write_shard(folder, i, a, b, H[a:b], preds[a:b], dtype)
        for i, (a, b) in enumerate(shard_ranges(len(H), shard_size))
    ]
    write_index(folder, len(H), entries, dtype)
    return HeatmapShards(folder)


def test_float16_store_keeps_heatmaps_of_any_scale_and_the_pseudo_groups(tmp_path):
    """A float16 store halves the bytes; per-heatmap scales keep huge and tiny relevances in range, and
    the clusterer gets the same groups as from float32 (exact path, and the streamed shards)."""
    from exmap_ray.groups import pseudo_groups
    from exmap_ray.clustering.scale import planted_heatmaps

    H, planted = planted_heatmaps(2000, seed=3)
    H[:500] *= 1e6  # beyond float16's largest value (65504) unless scaled
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
    assert (np.abs(back - H) <= peak * 2.0**-11).all()
    np.testing.assert_allclose(s16[7], back[7])  # one heatmap (plots) = the same as the whole load
    np.testing.assert_array_equal(s16.preds(), preds)

    cs = from_dict({"clustering": {"method": "spectral", "k": "auto", "scope": "global"}}).clustering
    ref, info = pseudo_groups(s32.load(), preds, cs, seed=0)
    for given in (s16.for_clustering(whole_below=10**9), s16.for_clustering(whole_below=0, normalized=True)):
        labels, info16 = pseudo_groups(given, preds, cs, seed=0)
        np.testing.assert_array_equal(labels, ref)
        assert info16["scopes"]["global"]["k"] == info["scopes"]["global"]["k"]
    # the streamed shards are the stored float16 rows, memory-mapped, each already divided by its max |value|
    shards = s16.for_clustering(whole_below=0, normalized=True)
    assert all(isinstance(a, np.memmap) and a.dtype == np.float16 for a in shards)
    assert np.abs(np.asarray(shards[0], np.float32)).reshape(700, -1).max(1)[:5].tolist() == [1.0] * 5
