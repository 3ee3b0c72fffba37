"""The shortcut zoo (exmap_ray/data/zoo): every registered family, on a few hundred real MNIST digits.

Each family's groups are what it says, its shortcut agrees with the class as often as its keys ask
(and not at all beyond chance on test), and its pixel probe reads the attribute back from the rendered
images: the shortcut is really in the pixels.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pytest
import torch

from exmap_ray.data import DATASETS, build_dataset
from exmap_ray.data.zoo import FAMILIES, assign_attrs
from exmap_ray.data.zoo.painters import PAINTERS, PHOTOS, photo_folder
from exmap_ray.errors import SpecError
from exmap_ray.spec import from_dict

NAMES = [n for n in DATASETS.names() if n.startswith("zoo_")]
SIZES = {"n_train": 400, "n_val": 1000, "n_test": 400}
TINY = {"n_train": 100, "n_val": 300, "n_test": 100}
SIZES_10 = {"n_train": 2000, "n_val": 2000, "n_test": 1000}  # ten classes: minorities above the floors


def test_every_family_is_registered_and_every_painter_is_used():
    assert set(NAMES) == set(FAMILIES)
    assert {p for f in FAMILIES.values() for p in f.painters} == set(PAINTERS)
    assert any(len(f.painters) == 2 for f in FAMILIES.values())


@lru_cache(maxsize=None)
def build(name: str, seed: int = 0, **keys):
    keys = {k: list(v) if isinstance(v, tuple) else v for k, v in keys.items()}  # tuples: hashable, cached
    dspec = from_dict({"dataset": {"name": name, **{**SIZES, **keys}}}).dataset
    return dspec, build_dataset(dspec, seed)


def _rhos(dspec, painters) -> list[float]:
    return [dspec.rho] + [getattr(dspec, f"rho_{p}") for p in painters[1:]]


@pytest.mark.parametrize("classes", [2, 10])
@pytest.mark.parametrize("name", NAMES)
def test_groups_are_the_family_formula_with_the_asked_agreement(name, classes):
    """group = (y*2 + a1)*2 + a2 ...; each attribute agrees with y mod 2 at its rho on train and val (an
    exact share, up to the minimum sizes) and at chance on test; every true group has >= 2 val members."""
    sizes = SIZES if classes == 2 else SIZES_10
    dspec, data = build(name, classes=classes, **sizes)
    painters = FAMILIES[name].painters
    assert data.n_classes == classes and data.n_groups == classes * 2 ** len(painters)
    assert len(set(data.group_names)) == data.n_groups
    for split, n in zip(("train", "val", "test"), sizes.values()):
        s = data.split(split)
        assert len(s) == n and set(s.attrs) == set(painters)
        want_y = np.unique(s.y)
        assert want_y.min() >= 0 and want_y.max() < classes and len(want_y) == classes
        g = s.y.copy()
        for p in painters:
            g = g * 2 + s.attrs[p]
        assert np.array_equal(s.group, g) and s.group.dtype == np.int64
        for p, rho in zip(painters, _rhos(dspec, painters)):
            agree = (s.attrs[p] == s.y % 2).mean()
            assert agree == pytest.approx(0.5 if split == "test" else rho, abs=0.03), (split, p)
    assert np.bincount(data.val.group, minlength=data.n_groups).min() >= 2
    names = data.group_names
    assert names[0].startswith("y<5" if classes == 2 else "y=0")
    assert all(PAINTERS[p].values[1] in names[-1] for p in painters)


@pytest.mark.parametrize("name", NAMES)
def test_the_probe_reads_each_attribute_from_the_pixels(name):
    """The shortcut is in the image: the painter's probe, given only the pixels, recovers it."""
    _, data = build(name)
    for split in ("train", "val", "test"):
        s = data.split(split)
        x = s.images.x
        assert x.shape[1:] == (3, 32, 32) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
        for p in FAMILIES[name].painters:
            acc = (PAINTERS[p].probe(x) == s.attrs[p]).mean()
            assert acc >= 0.95, f"{name}: probe of {p} on {split} reads {acc:.3f}"


@pytest.mark.parametrize("name", NAMES)
def test_image_size_is_honoured_and_the_shortcut_still_shows(name):
    _, data = build(name, image_size=48, **TINY)
    x = data.val.images.x
    assert x.shape[1:] == (3, 48, 48)
    for p in FAMILIES[name].painters:
        assert (PAINTERS[p].probe(x) == data.val.attrs[p]).mean() >= 0.95


@pytest.mark.parametrize("name", NAMES)
def test_a_build_is_a_function_of_seed_and_keys(name):
    dspec, a = build(name, seed=3, **TINY)
    b = build_dataset(dspec, 3)  # built afresh, not from the cache
    other = build_dataset(dspec, 4)
    for split in ("train", "val", "test"):
        sa, sb = a.split(split), b.split(split)
        assert torch.equal(sa.images.x, sb.images.x) and np.array_equal(sa.group, sb.group)
        assert np.array_equal(sa.y, sb.y) and all(np.array_equal(sa.attrs[k], sb.attrs[k]) for k in sa.attrs)
    assert not torch.equal(a.val.images.x, other.val.images.x)


def test_splits_use_distinct_digits():
    """The three splits draw on disjoint digits: no val or test image is a train digit."""
    _, data = build("zoo_blur")  # blur off on half: compare the digit coverage of sharp images only
    sharp = {s: data.split(s).images.x[data.split(s).attrs["blur"] == 0].flatten(1) for s in ("train", "val", "test")}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert torch.cdist(sharp[a], sharp[b]).min() > 0


def test_the_shortcut_gaps_come_with_the_data():
    """shortcut_metrics(pred, y, attrs) gives each painter's gap (and the pair's joint one)."""
    _, data = build("zoo_frame_patch")
    t = data.test
    out = data.shortcut_metrics(t.attrs["frame"], t.y, t.attrs)  # a model that predicts the frame
    assert set(out) == {"id_acc", "frame_gap", "patch_gap", "frame+patch_gap"}
    assert out["id_acc"] == 1.0 and out["frame_gap"] == -1.0 and out["patch_gap"] == 0.0


def test_normalisation_keys_are_applied():
    _, plain = build("zoo_colour")
    _, normed = build("zoo_colour", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert torch.allclose(normed.val.images.x, (plain.val.images.x - 0.5) / 0.25)


def test_assign_attrs_keeps_two_per_group_in_small_cells():
    """With a strong shortcut and tiny classes, the minority still splits into groups of >= 2."""
    y = np.repeat([0, 1], 20)
    a1, a2 = assign_attrs(y, [0.99, 0.95], [2, 2], np.random.default_rng(0))
    g = (y * 2 + a1) * 2 + a2
    assert np.bincount(g, minlength=8).min() >= 2
    ones = assign_attrs(y, [1.0], [2], np.random.default_rng(0))[0]
    assert np.array_equal(ones, y)  # rho 1: no minority at all


def test_the_photos_ship_inside_the_installed_scikit_image():
    folder = photo_folder()
    for files in PHOTOS.values():
        for name in files:
            assert (folder / name).is_file(), name


@pytest.mark.parametrize(
    "keys, match",
    [
        ({"rho": 1.5}, r"'dataset.rho': got 1.5, expected a number in \[0, 1\]"),
        ({"classes": 3}, r"'dataset.classes': got 3, expected 2 \(y = digit >= 5\) or 10"),
        ({"n_train": 6000, "n_val": 4000, "n_test": 1}, r"= 10001, but dataset 'zoo_patch' draws from the 10,000 "),
        ({"n_val": 0}, r"'dataset.n_val': got 0, expected a number > 0"),
        ({"image_size": 12}, r"'dataset.image_size': got 12, but dataset 'zoo_patch' draws .* at least 16 pixels"),
        ({"rho_object": 0.9}, r"'dataset.rho_object' is not a key of dataset 'zoo_patch'.*zoo_texture_object"),
    ],
)
def test_bad_keys_are_refused_with_the_key_and_what_is_valid(keys, match):
    with pytest.raises(SpecError, match=match):
        from_dict({"dataset": {"name": "zoo_patch", **keys}})


def test_a_pair_checks_its_second_strength():
    with pytest.raises(SpecError, match=r"'dataset.rho_patch': got -0.1, expected a number in \[0, 1\]"):
        from_dict({"dataset": {"name": "zoo_frame_patch", "rho_patch": -0.1}})
