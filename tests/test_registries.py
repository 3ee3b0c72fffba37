"""The contract of every registry, parametrized over what is registered (timm's style).

A new clusterer, retrainer, heatmap method, group source or dataset is tested here the moment it is
registered: no name list to update (a new dataset adds its tiny fixture to DATASET_FIXTURES). Each
case runs on tiny arrays, the 370k-parameter `test_resnet` or a few dozen small images.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import timm
import torch

from exmap_ray import plugins, registry
from exmap_ray.clustering import CLUSTERERS
from exmap_ray.data import DATASETS, build_dataset, check_dataset
from exmap_ray.data.zoo import FAMILIES as ZOO_FAMILIES
from exmap_ray.errors import SpecError
from exmap_ray.groups import GROUP_SOURCES, GroupContext, infer_groups
from exmap_ray.heatmaps import HEATMAP_METHODS
from exmap_ray.retrain import RETRAINERS, Retrainer
from exmap_ray.spec import ClusteringSpec, HeatmapSpec, from_dict

from .conftest import make_folder_dataset
from .test_datasets_layouts import MAKERS

assert plugins  # every registry filled


def blobs(n_per=30, d=6, seed=0):
    """Two well-separated blobs (class = blob) plus a colour-like split inside each: 4 true groups."""
    rng = np.random.default_rng(seed)
    sub = np.repeat(np.arange(4), [n_per, n_per // 2, n_per, n_per // 2])
    y = sub // 2
    centers = rng.normal(size=(4, d)) * 5
    X = (centers[sub] + 0.3 * rng.normal(size=(len(sub), d))).astype(np.float32)
    return X, y, sub


# --------------------------------------------------------------------------- registry names and the spec


@pytest.mark.parametrize(
    "reg", [CLUSTERERS, RETRAINERS, HEATMAP_METHODS, GROUP_SOURCES, DATASETS], ids=lambda r: r.spec_key
)
def test_every_registry_checks_its_spec_key(reg):
    """The spec checks a registry's key through the registry (registry.for_key); a near name is offered."""
    assert registry.for_key(reg.spec_key) is reg and reg.names()
    section, key = reg.spec_key.split(".")
    name = reg.names()[0]
    assert getattr(getattr(from_dict({section: {key: name}}), section), key) == name
    with pytest.raises(
        SpecError,
        match=rf"spec key '{reg.spec_key}': unknown {reg.kind} '{name}x'. "
        rf"Registered: .*Did you mean '{name}'\?",
    ):
        from_dict({section: {key: name + "x"}})


# --------------------------------------------------------------------------- clusterers


@pytest.mark.parametrize("name", CLUSTERERS.names())
def test_clusterer_contract(name):
    """fn(X, cspec, seed) -> (labels (n,) int64 in 0..k-1, info with k); an integer k is used as given
    (by a splitting clusterer, at its first level: info k_first); the same seed gives the same labels."""
    X, y, _ = blobs()
    cspec = ClusteringSpec(method=name, k=2, k_max=4)
    labels, info = CLUSTERERS.get(name)(X, cspec, 0)
    again, _ = CLUSTERERS.get(name)(X, cspec, 0)
    # a clusterer that splits its clusters further (spectral_split) uses the given k at its first level
    assert labels.shape == (len(X),) and labels.dtype == np.int64 and info.get("k_first", info["k"]) == 2
    assert set(np.unique(labels)) <= set(range(info["k"])) and np.array_equal(labels, again)


# --------------------------------------------------------------------------- retrainers


@pytest.mark.parametrize("name", RETRAINERS.names())
def test_retrainer_contract(name):
    """fit(feats, y, groups, config(spec), seed) -> a head whose predict gives class labels; modes name
    the retrain.mode values it takes, and an end-to-end mode comes with a finetune."""
    X, y, sub = blobs(n_per=40)
    # with the dpe extra: a covariance weight for 6-d features (its default suits 2048-d ones)
    small = {"dpe": {"n_members": 3, "epochs": 20, "cov_reg_grid": [10.0]}} if "dpe" in RETRAINERS else {}
    spec = from_dict(
        {
            "retrain": {
                "n_select_repeats": 1,
                "dfr": {"c_grid": [1.0], "n_final_fits": 2},
                "groupdro": {"weight_decay_grid": [1e-2], "epochs": 2},
                "jtt": {"weight_decay_grid": [1e-2]},
                **small,
            }
        }
    )
    r = RETRAINERS.get(name)
    assert isinstance(r, Retrainer) and r.config(spec).own is getattr(spec.retrain, name)
    model = r.fit(X, y, sub, r.config(spec), 0)
    pred = np.asarray(model.predict(X))
    assert pred.shape == (len(y),) and set(np.unique(pred)) <= {0, 1}
    assert (pred == y).mean() > 0.9  # two separated blobs: any retrainer gets the classes
    assert "last_layer" in r.modes and (("end_to_end" in r.modes) == (r.finetune is not None))


def _declared(keys) -> list:
    return dataclasses.fields(keys) if keys is not None else []


@pytest.mark.parametrize("name", RETRAINERS.names())
def test_retrainer_owns_a_section_whose_every_key_has_a_reason(name):
    """Its `keys` dataclass is the spec section retrain.<name>: every key has a default, a reason and a
    type the spec checks; a declared search range is a valid domain of the key; config(spec) hands over
    that section with the shared keys."""
    from exmap_ray.search import parse_space

    r = RETRAINERS.get(name)
    assert r.section == f"retrain.{name}" and dataclasses.is_dataclass(r.keys)
    defaults = from_dict({})
    assert getattr(defaults.retrain, name) == r.keys()
    for f in _declared(r.keys):
        assert len(f.metadata.get("why") or "") > 10, f"retrain.{name}.{f.name} has no reason"
        if f.metadata.get("search"):
            (d,) = parse_space(from_dict({"search": {"space": {f"retrain.{name}.{f.name}": "default"}}}))
            assert d.key == f"retrain.{name}.{f.name}"
    cfg = r.config(defaults)
    for f in _declared(r.keys):
        assert getattr(cfg, f.name) == getattr(r.keys(), f.name)
    assert cfg.n_select_repeats == defaults.retrain.n_select_repeats


@pytest.mark.parametrize("name", DATASETS.names())
def test_dataset_declares_its_keys_each_with_a_reason_valid_for_it_alone(name):
    """A dataset's own keys (DatasetEntry.keys) join the common ones when dataset.name names it, each with
    a reason; a key only other datasets take is refused, naming them."""
    entry = DATASETS.get(name)
    spec = from_dict({"dataset": {"name": name}})
    own = [f.name for f in _declared(entry.keys)]
    for f in _declared(entry.keys):
        assert len(f.metadata.get("why") or "") > 10, f"dataset {name}: key {f.name} has no reason"
        assert getattr(spec.dataset, f.name) == getattr(entry.keys(), f.name)
    others = {f.name: n for n in DATASETS.names() for f in _declared(DATASETS.get(n).keys) if f.name not in own}
    for key, other in others.items():
        with pytest.raises(SpecError, match=rf"'dataset.{key}' is not a key of dataset '{name}': dataset.s. .*{other}"):
            from_dict({"dataset": {"name": name, key: getattr(DATASETS.get(other).keys(), key)}})


# --------------------------------------------------------------------------- heatmap methods


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return timm.create_model("test_resnet", num_classes=2).eval()


@pytest.mark.parametrize("name", HEATMAP_METHODS.names())
def test_heatmap_method_contract(name, tiny_model):
    """Method(model, hspec)(x) -> (relevance (B, C', H', W') finite, the predicted class (B,)); its
    explain(x) adds the penultimate features and logits of that forward (the heatmaps stage keeps them)."""
    from exmap_ray.models import embed

    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    method = HEATMAP_METHODS.get(name)(tiny_model, HeatmapSpec(precision="fp32", ig_steps=4))
    rel, pred = method(x)
    with torch.no_grad():
        want = tiny_model(x).argmax(1)
    assert rel.ndim == 4 and rel.shape[0] == 2 and torch.isfinite(rel).all() and rel.abs().sum() > 0
    assert torch.equal(pred.cpu(), want)
    e = method.explain(x)
    f, logits = embed(tiny_model, x, precision="fp32")
    torch.testing.assert_close(e.features, torch.from_numpy(f), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(e.logits, torch.from_numpy(logits), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(e.relevance, rel)


# --------------------------------------------------------------------------- group sources


@pytest.mark.parametrize("name", GROUP_SOURCES.names())
def test_group_source_contract(name):
    """infer_groups(name, ctx) -> (int64 ids, one per val point, info naming the source and its groups);
    only an oracle source reads the true groups."""
    X, y, sub = blobs()
    logits = np.eye(2)[y]
    ctx = GroupContext(
        y_val=y,
        clustering=ClusteringSpec(method="kmeans", k=2, scope="local", min_group_size=3),
        seed=0,
        val_features=X,
        val_logits=logits,
        heatmaps=X.reshape(len(X), 1, 2, 3),
        true_groups=sub,
        random_k=2,
    )
    groups, info = infer_groups(name, ctx)
    assert groups.shape == (len(y),) and groups.dtype == np.int64
    assert info["source"] == name and info["n_groups"] == len(np.unique(groups)) >= 1
    if GROUP_SOURCES.get(name).oracle:
        assert np.array_equal(groups, sub)


# --------------------------------------------------------------------------- datasets


def _cmnist(tmp_path, name):
    return {"name": name, "n_train": 200, "n_val": 200, "n_test": 200, "rho": 0.9}


def _on_disk(maker):
    def make(tmp_path, name):
        return {"name": name, "root": str(maker(tmp_path)), "image_size": 32, "decode_cache": None}

    return make


DATASET_FIXTURES = {  # name -> (tmp_path, name) -> the dataset section of a tiny spec
    "cmnist": _cmnist,
    "cmnist_multi": _cmnist,
    **{name: _cmnist for name in ZOO_FAMILIES},  # the shortcut zoo takes cmnist's rho and split sizes too
    "folder": _on_disk(lambda t: make_folder_dataset(t / "ds", per_group=2)),
    **{name: _on_disk(maker) for name, maker in MAKERS.items()},
}


@pytest.mark.parametrize("name", DATASETS.names())
def test_dataset_contract(tmp_path, name):
    """build(dspec, seed) -> GroupData: three non-empty splits of (C, H, W) float images with int64 y in
    0..n_classes-1 and true groups in 0..n_groups-1, two classes in train and val; an on-disk dataset's
    scanner agrees with its builder, and `datasets check` passes on it."""
    if name not in DATASET_FIXTURES:
        pytest.fail(f"dataset '{name}' is registered but has no tiny fixture in DATASET_FIXTURES")
    dspec = from_dict({"dataset": DATASET_FIXTURES[name](tmp_path, name)}).dataset
    entry = DATASETS.get(name)
    assert entry.name == name and entry.summary
    data = build_dataset(dspec, 0)
    assert data.n_classes >= 2 and data.n_groups >= 2
    for split in ("train", "val", "test"):
        s = data.split(split)
        assert len(s) == len(s.images) == len(s.group) > 0
        assert s.y.dtype == np.int64 and s.group.dtype == np.int64
        assert 0 <= s.y.min() and s.y.max() < data.n_classes and 0 <= s.group.min() and s.group.max() < data.n_groups
        assert all(len(v) == len(s) for v in s.attrs.values())
        x = s.images[0]
        assert x.dtype == torch.float32 and x.ndim == 3
        if split != "test":
            assert len(np.unique(s.y)) >= 2
    if entry.scan is not None:
        scan = entry.scan(dspec)
        assert not scan.findings and len(scan.table["paths"]) == sum(
            len(data.split(s)) for s in ("train", "val", "test")
        )
        report = check_dataset(dspec)
        assert report.ok and report.verified and report.n_images == len(scan.table["paths"])
