import gzip
import shutil

import numpy as np
import pytest

from exmap_ray.data import DATASETS, build_dataset
from exmap_ray.data.cmnist import SHIPPED, load_digits
from exmap_ray.errors import DataError, SpecError
from exmap_ray.spec import from_dict

from .conftest import make_folder_dataset


def test_shipped_mnist_is_verified_real_digits():
    x, y = load_digits(None)
    assert x.shape == (10000, 28, 28) and x.dtype == np.uint8
    assert np.bincount(y).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_cmnist_groups_and_shortcut():
    spec = from_dict({"dataset": {"rho": 0.99, "n_train": 3000, "n_val": 2000, "n_test": 2000}})
    d = build_dataset(spec.dataset, 0)
    for split in (d.train, d.val, d.test):
        assert np.bincount(split.group, minlength=4).min() > 0, "every (y, colour) group in every split"
        x = split.images[0]
        assert x.shape == (3, 28, 28) and float(x[2].abs().sum()) == 0.0  # blue channel unused
    colour = d.train.group % 2
    agree = (colour == d.train.y).mean()
    assert abs(agree - 0.99) < 0.002
    assert abs((d.test.group % 2 == d.test.y).mean() - 0.5) < 0.01  # test colour independent of y
    # the colour channel holding the digit is the group's colour
    i = int(np.flatnonzero(d.val.group == 1)[0])
    assert float(d.val.images[i][1].sum()) > 0 and float(d.val.images[i][0].sum()) == 0
    # deterministic per seed, different across seeds
    assert np.array_equal(build_dataset(spec.dataset, 0).val.group, d.val.group)
    assert not np.array_equal(build_dataset(spec.dataset, 1).val.y, d.val.y)


def test_cmnist_rejects_more_digits_than_available():
    spec = from_dict({"dataset": {"n_train": 9000, "n_val": 2000}})
    with pytest.raises(SpecError, match="dataset.n_train"):
        build_dataset(spec.dataset, 0)


def test_cmnist_reads_torchvision_raw_layout(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for part in ("train", "t10k"):
        for kind in ("images-idx3", "labels-idx1"):
            src = SHIPPED / f"t10k-{kind}-ubyte.gz"
            with gzip.open(src) as f_in, open(raw / f"{part}-{kind}-ubyte", "wb") as f_out:
                shutil.copyfileobj(f_in, f_out)  # uncompressed, as torchvision leaves them
    x, y = load_digits(str(tmp_path))
    assert x.shape == (20000, 28, 28) and len(y) == 20000
    (raw / "train-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="train-labels-idx1-ubyte"):
        load_digits(str(tmp_path))
    with pytest.raises(DataError, match="is not a folder"):
        load_digits(str(tmp_path / "nowhere"))


def _folder_spec(root, **kw):
    return from_dict({"dataset": {"name": "folder", "root": str(root), "image_size": 32, **kw}}).dataset


@pytest.mark.parametrize("col", ["place", "spurious"])
def test_folder_dataset_groups(tmp_path, col):
    root = make_folder_dataset(tmp_path / "ds", per_group=3, spurious_col=col)
    d = build_dataset(_folder_spec(root), 0)
    assert (len(d.train), len(d.val), len(d.test)) == (12, 12, 12)
    assert d.n_classes == 2 and d.n_groups == 4
    assert np.bincount(d.val.group).tolist() == [3, 3, 3, 3]
    assert np.array_equal(d.val.group, d.val.y * 2 + (d.val.group % 2))
    assert d.train.images[0].shape == (3, 32, 32)
    assert d.group_names[1] == f"y=0 {col}=1"


def _rewrite(root, fn):
    lines = (root / "metadata.csv").read_text().splitlines()
    (root / "metadata.csv").write_text("\n".join(fn(lines)) + "\n")


def test_folder_group_column_overrides(tmp_path):
    root = make_folder_dataset(tmp_path / "ds", per_group=2)
    _rewrite(root, lambda ls: [ls[0] + ",group"] + [l + ",0" for l in ls[1:]])
    d = build_dataset(_folder_spec(root), 0)
    assert set(d.val.group.tolist()) == {0}


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda ls: [ls[0].replace("split", "fold")] + ls[1:], "has no column 'split'"),
        (lambda ls: [ls[0].replace("place", "where")] + ls[1:], "has no column 'place' or 'spurious'"),
        (lambda ls: [ls[0], "imgs/s0_y0_p0_0.png,0,7,0"] + ls[2:], "column 'split': line 2 has '7'"),
        (lambda ls: [ls[0]] + [l for l in ls[1:] if l.split(",")[2] != "1"], "the val split (split == 1) is empty"),
        (lambda ls: [ls[0], "imgs/missing.png,0,0,0"] + ls[1:], "1 image file(s) listed in"),
        (lambda ls: [ls[0], "imgs/x.png,zero,0,0"] + ls[1:], "column 'y': line 2 has 'zero'"),
    ],
)
def test_folder_bad_metadata_is_named(tmp_path, breakage, message):
    root = make_folder_dataset(tmp_path / "ds", per_group=2)
    _rewrite(root, breakage)
    with pytest.raises(DataError) as e:
        build_dataset(_folder_spec(root), 0)
    assert message in str(e.value) and "metadata.csv" in str(e.value)


def test_folder_missing_root_and_corrupt_image(tmp_path):
    with pytest.raises(DataError, match="does not exist. Fix: set dataset.root to the folder that holds metadata.csv"):
        build_dataset(_folder_spec(tmp_path / "nope"), 0)
    with pytest.raises(SpecError, match="dataset.root"):
        build_dataset(from_dict({"dataset": {"name": "folder"}}).dataset, 0)
    root = make_folder_dataset(tmp_path / "ds", per_group=2)
    d = build_dataset(_folder_spec(root), 0)
    bad = d.train.images.paths[0]
    bad.write_bytes(b"not a png")
    with pytest.raises(DataError, match=bad.name):
        d.train.images[0]


def test_unknown_dataset_name():
    with pytest.raises(SpecError, match=f"unknown dataset 'imagenet'. Registered: {', '.join(DATASETS.names())}"):
        build_dataset(from_dict({"dataset": {"name": "imagenet"}}).dataset, 0)
