"""The on-disk benchmarks (Waterbirds, CelebA, MetaShift, UrbanCars) in their real folder layouts.

Each fixture writes a tiny copy of a dataset's layout with real JPEGs (PIL): the class is a shape
(square / bar), the spurious attribute a background tint, UrbanCars' co-occurring object a corner
patch. Broken variants plant one fault each; `exmap-ray datasets check` must name it and its fix.
One parametrized test runs each shipped spec (tune_specs/<name>.yaml) end to end on its fixture.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from exmap_ray.cli import main
from exmap_ray.data import DATASETS, build_dataset, check_dataset
from exmap_ray.data.images import eval_resize
from exmap_ray.data.urbancars import urbancars_gaps
from exmap_ray.errors import DataError
from exmap_ray.spec import from_dict, load_spec

SPECS = Path(__file__).resolve().parents[1] / "tune_specs"
CELEBA_ATTRS = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose "
    "Black_Hair Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee "
    "Gray_Hair Heavy_Makeup High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard "
    "Oval_Face Pale_Skin Pointy_Nose Receding_Hairline Rosy_Cheeks Sideburns Smiling Straight_Hair "
    "Wavy_Hair Wearing_Earrings Wearing_Hat Wearing_Lipstick Wearing_Necklace Wearing_Necktie "
    "Young"
).split()


@pytest.fixture(autouse=True)
def decode_cache_in_tmp(tmp_path, monkeypatch):
    """`decode_cache: auto` (the CLI's default) resolves here, not under the home folder."""
    monkeypatch.setenv("EXMAP_RAY_DECODE_CACHE", str(tmp_path / "auto-cache"))


def picture(y: int, s: int, rng, size: int = 40, patch: int | None = None) -> Image.Image:
    """Class y = a square or a vertical bar; s = a red or blue background; patch = a corner marker."""
    img = np.zeros((size, size, 3), np.uint8)
    img[..., 2 if s else 0] = 90 + rng.integers(0, 40)
    img[..., 1] = rng.integers(0, 30)
    if y:
        img[size // 5 : 4 * size // 5, size // 2 - 3 : size // 2 + 3] = 255
    else:
        img[size // 3 : 2 * size // 3, size // 3 : 2 * size // 3] = 255
    if patch is not None:
        img[:8, :8] = (0, 255, 0) if patch else (255, 255, 0)
    return Image.fromarray(img)


def save(img: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, quality=95)


# --------------------------------------------------------------------------- fixtures in the real layouts


def make_waterbirds(base: Path, per_group: int = 4) -> Path:
    root = base / "waterbird_complete95_forest2water2"
    rng = np.random.default_rng(0)
    rows, i = [], 0
    for split in (0, 1, 2):
        for y in (0, 1):
            for place in (0, 1):
                for _ in range(per_group):
                    i += 1
                    species = "001.Black_footed_Albatross" if y else "023.Brandt_Cormorant"
                    name = f"{species}/{species.split('.')[1]}_{i:04d}_{i}.jpg"
                    save(picture(y, place, rng), root / name)
                    rows.append([i, name, y, split, place, f"/b/bamboo_forest/{i:08d}.jpg"])
    with open(root / "metadata.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["img_id", "img_filename", "y", "split", "place", "place_filename"])
        w.writerows(rows)
    return root


def make_celeba(base: Path, per_group: int = 4) -> Path:
    """The official files: img_align_celeba/, list_attr_celeba.txt, list_eval_partition.txt."""
    root = base / "celeba"
    rng = np.random.default_rng(1)
    attr_lines, part_lines, i = [], [], 0
    yi, si, smile = CELEBA_ATTRS.index("Blond_Hair"), CELEBA_ATTRS.index("Male"), CELEBA_ATTRS.index("Smiling")
    for split in (0, 1, 2):
        for y in (0, 1):
            for s in (0, 1):
                for k in range(per_group):
                    i += 1
                    name = f"{i:06d}.jpg"
                    save(picture(y, s, rng, size=44), root / "img_align_celeba" / name)
                    vals = rng.choice([-1, 1], size=len(CELEBA_ATTRS))
                    vals[yi], vals[si], vals[smile] = 2 * y - 1, 2 * s - 1, 1 if k % 2 else -1
                    attr_lines.append(name + " " + " ".join(f"{v:2d}" for v in vals))
                    part_lines.append(f"{name} {split}")
    (root / "list_attr_celeba.txt").write_text(f"{i}\n" + " ".join(CELEBA_ATTRS) + " \n" + "\n".join(attr_lines) + "\n")
    (root / "list_eval_partition.txt").write_text("\n".join(part_lines) + "\n")
    return root


def make_celeba_dfr(base: Path, per_group: int = 3) -> Path:
    """The DFR variant: img_align_celeba/ and metadata.csv (img_filename, y = Blond_Hair, split, place = Male)."""
    root = base / "celeba_dfr"
    rng = np.random.default_rng(2)
    rows, i = [], 0
    for split in (0, 1, 2):
        for y in (0, 1):
            for s in (0, 1):
                for _ in range(per_group):
                    i += 1
                    name = f"img_align_celeba/{i:06d}.jpg"
                    save(picture(y, s, rng), root / name)
                    rows.append([i, name, y, split, s])
    with open(root / "metadata.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["img_id", "img_filename", "y", "split", "place"])
        w.writerows(rows)
    return root


METASHIFT_DIRS = {
    "train/cat/cat(indoor)": (1, 1),
    "train/dog/dog(outdoor)": (0, 0),
    "test/cat/cat(outdoor)": (1, 0),
    "test/dog/dog(indoor)": (0, 1),
}


def make_metashift(base: Path, per_group: int = 16) -> Path:
    root = base / "MetaShift-Cat-Dog-indoor-outdoor"
    rng = np.random.default_rng(3)
    for rel, (y, place) in METASHIFT_DIRS.items():
        for k in range(per_group):
            save(picture(y, place, rng), root / rel / f"{rel.split('/')[-1][:3]}_{k:03d}.jpg")
    return root


def make_urbancars(base: Path, per_group: dict | None = None) -> Path:
    root = base / "urbancars"
    per_group = per_group or {"train": 3, "val": 3, "test": 2}
    rng = np.random.default_rng(4)
    names = ["urban", "country"]
    for split, n in per_group.items():
        ratio = "bg-0.95_co_occur_obj-0.95" if split == "train" else "bg-0.5_co_occur_obj-0.5"
        for o in (0, 1):
            for b in (0, 1):
                for c in (0, 1):
                    d = root / ratio / split / f"obj-{names[o]}_bg-{names[b]}_co_occur_obj-{names[c]}"
                    for k in range(n):
                        save(picture(o, b, rng, patch=c), d / f"{k:05d}.jpg")
    return root


MAKERS = {
    "waterbirds": make_waterbirds,
    "celeba": make_celeba,
    "metashift": make_metashift,
    "urbancars": make_urbancars,
}


def dspec(name: str, root: Path, **kw):
    return from_dict(
        {"dataset": {"name": name, "root": str(root), "image_size": 32, "decode_cache": None, **kw}}
    ).dataset


def counts(split) -> list[int]:
    return np.bincount(split.group, minlength=int(split.group.max()) + 1).tolist()


# --------------------------------------------------------------------------- reading the layouts


def test_waterbirds_groups_and_paper_transforms(tmp_path):
    root = make_waterbirds(tmp_path)
    d = build_dataset(dspec("waterbirds", root), 0)
    assert d.n_classes == 2 and d.group_names == [
        "landbird on land",
        "landbird on water",
        "waterbird on land",
        "waterbird on water",
    ]
    for split in (d.train, d.val, d.test):
        assert counts(split) == [4, 4, 4, 4]
        assert np.array_equal(split.group, 2 * split.y + split.group % 2)
    # train: random crop + flip; eval: resize to round(32 * 256 / 224) = 37, centre crop 32: deterministic
    assert eval_resize(224) == 256 and eval_resize(32) == 37
    torch.manual_seed(0)
    a, b = d.train.images[0], d.train.images[0]
    assert a.shape == b.shape == (3, 32, 32) and not torch.equal(a, b)
    v = d.val.images[3]
    assert v.shape == (3, 32, 32) and torch.equal(v, d.val.images[3])
    # ImageNet normalisation: the white shape (255) maps to (1 - mean) / std per channel
    assert float(v[0].max()) == pytest.approx((1 - 0.485) / 0.229, abs=1e-4)


def test_decode_cache_matches_direct_decoding_and_is_reused(tmp_path):
    root = make_waterbirds(tmp_path)
    cache = tmp_path / "decoded"
    direct = build_dataset(dspec("waterbirds", root), 0)
    cached = build_dataset(dspec("waterbirds", root, decode_cache=str(cache)), 0)
    files = sorted(cache.glob("*.npy"))
    assert [f.name.split("-")[1] for f in files] == ["test", "val"]
    arr = np.load(files[1], mmap_mode="r")
    assert arr.shape == (16, 3, 32, 32) and arr.dtype == np.uint8
    for i in (0, 7, 15):  # the memmapped uint8 path gives exactly the transform's values
        assert torch.allclose(cached.val.images[i], direct.val.images[i], atol=1e-6)
    stamp = {f: f.stat().st_mtime_ns for f in files}
    build_dataset(dspec("waterbirds", root, decode_cache=str(cache)), 0)  # a second run: no new decode
    assert {f: f.stat().st_mtime_ns for f in sorted(cache.glob("*.npy"))} == stamp
    (root / "metadata.csv").touch()  # the key covers the image files, not the index: still reused
    build_dataset(dspec("waterbirds", root, decode_cache=str(cache), image_size=24), 0)
    assert len(list(cache.glob("*.npy"))) == 4  # another size is another file


def test_celeba_official_files_any_attribute_pair(tmp_path):
    root = make_celeba(tmp_path)
    d = build_dataset(dspec("celeba", root), 0)
    assert d.group_names == ["Blond_Hair=0 Male=0", "Blond_Hair=0 Male=1", "Blond_Hair=1 Male=0", "Blond_Hair=1 Male=1"]
    assert [counts(s) for s in (d.train, d.val, d.test)] == [[4, 4, 4, 4]] * 3
    assert d.val.images[0].shape == (3, 32, 32)
    # another pair: Smiling is set on every second image of each (y, s) cell
    d2 = build_dataset(dspec("celeba", root, target="Smiling", spurious="Blond_Hair"), 0)
    assert d2.group_names[3] == "Smiling=1 Blond_Hair=1" and counts(d2.val) == [4, 4, 4, 4]
    assert np.array_equal(d2.val.y, np.tile([0, 1], 8))
    # the official download's own folders: Anno/, Eval/, Img/img_align_celeba/
    for sub, name in (
        ("Anno", "list_attr_celeba.txt"),
        ("Eval", "list_eval_partition.txt"),
        ("Img", "img_align_celeba"),
    ):
        (root / sub).mkdir()
        (root / name).rename(root / sub / name)
    assert counts(build_dataset(dspec("celeba", root), 0).test) == [4, 4, 4, 4]
    with pytest.raises(DataError) as e:
        build_dataset(dspec("celeba", root, target="Blonde_Hair"), 0)
    msg = str(e.value)
    assert "spec key 'dataset.target': 'Blonde_Hair' is not an attribute" in msg and "did you mean 'Blond_Hair'" in msg
    assert "Valid names: 5_o_Clock_Shadow, Arched_Eyebrows" in msg and "Young" in msg


def test_celeba_dfr_metadata_variant(tmp_path):
    root = make_celeba_dfr(tmp_path)
    d = build_dataset(dspec("celeba", root), 0)
    assert [counts(s) for s in (d.train, d.val, d.test)] == [[3, 3, 3, 3]] * 3
    with pytest.raises(DataError, match="has only metadata.csv .* cannot give Smiling vs Male"):
        build_dataset(dspec("celeba", root, target="Smiling"), 0)


def test_metashift_folders_stratified_split_or_metadata(tmp_path):
    root = make_metashift(tmp_path)
    d = build_dataset(dspec("metashift", root), 0)
    assert d.group_names == ["dog outdoor", "dog indoor", "cat outdoor", "cat indoor"]
    # 16 per folder: 25% test (4), 10% val (at least 2), the rest train; every group in every split
    assert [counts(s) for s in (d.train, d.val, d.test)] == [[10] * 4, [2] * 4, [4] * 4]
    again = build_dataset(dspec("metashift", root), 1)  # the split does not depend on the run seed
    assert [p.name for p in again.val.images.paths] == [p.name for p in d.val.images.paths]
    # a metadata.csv (as generate_metadata_metashift writes it) takes precedence, with its own split
    rows = [
        [f"{rel}/{p.name}", y, 1 if k < 3 else 0 if k < 12 else 2, place]
        for rel, (y, place) in METASHIFT_DIRS.items()
        for k, p in enumerate(sorted((root / rel).glob("*.jpg")))
    ]
    with open(root / "metadata.csv", "w", newline="") as f:
        csv.writer(f).writerows([["img_filename", "y", "split", "place"]] + rows)
    d = build_dataset(dspec("metashift", root), 0)
    assert [counts(s) for s in (d.train, d.val, d.test)] == [[9] * 4, [3] * 4, [4] * 4]


@pytest.mark.parametrize("group_by, n_groups", [("both", 8), ("bg", 4), ("co_occur_obj", 4)])
def test_urbancars_groups_attrs_and_group_by(tmp_path, group_by, n_groups):
    root = make_urbancars(tmp_path)
    d = build_dataset(dspec("urbancars", root, group_by=group_by), 0)
    assert d.n_groups == n_groups and d.n_classes == 2
    assert counts(d.val) == [3 * 8 // n_groups] * n_groups and len(d.train) == 24 and len(d.test) == 16
    bg, co = d.val.attrs["bg"], d.val.attrs["co_occur_obj"]
    expect = {"both": 4 * d.val.y + 2 * bg + co, "bg": 2 * d.val.y + bg, "co_occur_obj": 2 * d.val.y + co}[group_by]
    assert np.array_equal(d.val.group, expect)
    assert d.shortcut_metrics is not None and d.group_names[0].startswith("urban car")


def test_shortcut_gaps_follow_urbancars_definition():
    # 2 classes x bg x co-object; one sample per (class, bg, co) cell, repeated 10 times
    y, bg, co = (
        np.repeat(np.array(v), 10)
        for v in ([0, 0, 0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 0, 0, 1, 1], [0, 1, 0, 1, 0, 1, 0, 1])
    )
    attrs = {"bg": bg, "co_occur_obj": co}
    perfect = urbancars_gaps(y, y, attrs)
    assert perfect["id_acc"] == 1.0 and perfect["bg_gap"] == perfect["co_occur_obj_gap"] == perfect["both_gap"] == 0
    follows_bg = urbancars_gaps(bg, y, attrs)  # a model that predicts the background
    assert follows_bg["acc_bg_absent_coobj_present"] == 0.0 and follows_bg["acc_bg_present_coobj_absent"] == 1.0
    # in-distribution: cells weighted by the train ratios (0.95 each): 0.9025 + 0.0475 (bg present, co absent)
    assert follows_bg["id_acc"] == pytest.approx(0.95)
    assert follows_bg["bg_gap"] == pytest.approx(-0.95) and follows_bg["both_gap"] == pytest.approx(-0.95)
    assert follows_bg["co_occur_obj_gap"] == pytest.approx(0.05)
    assert urbancars_gaps(bg, y, attrs, bg_ratio=0.5, co_occur_obj_ratio=0.5)["id_acc"] == pytest.approx(0.5)


# --------------------------------------------------------------------------- `datasets check` on planted faults


def _drop_csv_lines(path: Path, keep) -> None:
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0]] + [ln for ln in lines[1:] if keep(ln)]) + "\n")


def _sub_csv(path: Path, old: str, new: str, line: int | None = None) -> None:
    lines = path.read_text().splitlines()
    idx = range(len(lines)) if line is None else [line - 1]
    for i in idx:
        lines[i] = lines[i].replace(old, new)
    path.write_text("\n".join(lines) + "\n")


def _garbage(path: Path) -> None:
    path.write_bytes(b"\x00this is not a jpeg\xff" * 4)


def wb_missing_file(root):
    (root / "001.Black_footed_Albatross" / "Black_footed_Albatross_0009_9.jpg").unlink()
    return root, [
        "missing file",
        "1 image file(s) listed in",
        "line 10: '",
        "Black_footed_Albatross_0009_9.jpg",
        "restore those files from the group_DRO Waterbirds tarball",
        "or delete their lines from",
    ]


def wb_unreadable(root):
    _garbage(root / "023.Brandt_Cormorant" / "Brandt_Cormorant_0017_17.jpg")
    return root, [
        "unreadable image",
        "1 file(s) cannot be read as images",
        "Brandt_Cormorant_0017_17.jpg",
        "replace them with the original files",
    ]


def wb_missing_column(root):
    _sub_csv(root / "metadata.csv", "place,place_filename", "places,place_filename", line=1)
    return root, ["missing column", "has no column 'place'", "rename the column 'places' to 'place'"]


def wb_bad_split(root):
    _sub_csv(root / "metadata.csv", ",0,0,/b/", ",7,0,/b/", line=5)
    return root, ["bad split value", "column 'split': line 5 has '7'", "to 0 (train), 1 (val) or 2 (test)"]


def wb_wrong_root(root):
    return root.parent, ["wrong folder", "has no metadata.csv, but", f"set dataset.root={root}"]


def wb_renamed_index(root):
    (root / "metadata.csv").rename(root / "Metadata.csv")
    return root, ["renamed file", "metadata.csv' not found, but", f"rename '{root / 'Metadata.csv'}' to"]


def ca_missing_attr_file(root):
    (root / "list_attr_celeba.txt").unlink()
    return root, [
        "missing attribute file",
        "neither list_attr_celeba.txt nor list_attr_celeba.csv",
        f"put list_attr_celeba.txt (Anno/ of the CelebA release) in {root}",
    ]


def ca_bad_partition(root):
    _sub_csv(root / "list_eval_partition.txt", "000005.jpg 0", "000005.jpg 5")
    return root, ["bad split value", "line 5 is '000005.jpg 5'", "must be 'FILE 0|1|2'"]


def ca_wrong_image_folder(root):
    (root / "img_align_celeba").rename(root / "img_celeba")
    return root, ["wrong folder name", "img_align_celeba/' not found, but", "rename '", "img_celeba' to '"]


def ca_unknown_attribute(root):
    return (root, {"target": "Smile"}), [
        "unknown attribute",
        "'Smile' is not an attribute",
        "did you mean 'Smiling'",
        "--set dataset.target=Smiling",
    ]


def ca_missing_image(root):
    (root / "img_align_celeba" / "000042.jpg").unlink()
    return root, ["missing file", "list_attr_celeba.txt line 44: '", "000042.jpg", "re-extract img_align_celeba.zip"]


def ms_wrong_folder_name(root):
    (root / "train/cat/cat(indoor)").rename(root / "train/cat/cat_indoor")
    return root, [
        "wrong folder name",
        "cat(indoor)/' not found, but",
        "cat_indoor/' exists",
        f"rename '{root / 'train/cat/cat_indoor'}' to '{root / 'train/cat/cat(indoor)'}'",
    ]


def ms_unreadable(root):
    _garbage(root / "test/dog/dog(indoor)/dog_003.jpg")
    return root, ["unreadable image", "dog(indoor)/dog_003.jpg", "UnidentifiedImageError"]


def ms_metadata_missing_column(root):
    with open(root / "metadata.csv", "w", newline="") as f:
        csv.writer(f).writerows([["img_filename", "y", "split"], ["train/cat/cat(indoor)/cat_000.jpg", 1, 0]])
    return root, ["missing column", "has no column 'place'", "it needs the columns img_filename, y, split, place"]


def ms_metadata_missing_file(root):
    rows = (
        [["img_filename", "y", "split", "place"]]
        + [
            [f"{rel}/{rel.split('/')[-1][:3]}_{k:03d}.jpg", y, k % 3, p]
            for rel, (y, p) in METASHIFT_DIRS.items()
            for k in range(16)
        ]
        + [["train/dog/dog(outdoor)/dog_999.jpg", 0, 0, 0]]
    )
    with open(root / "metadata.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return root, ["missing file", "line 66: '", "dog_999.jpg", "delete their lines from"]


def uc_wrong_ratio_folder(root):
    (root / "bg-0.95_co_occur_obj-0.95").rename(root / "bg-0.95_co_occur-0.95")
    return root, [
        "wrong folder name",
        "bg-0.95_co_occur-0.95/' holds train/, but its name is not",
        f"rename '{root / 'bg-0.95_co_occur-0.95'}' to '{root / 'bg-0.95_co_occur_obj-0.95'}'",
    ]


def uc_missing_split(root):
    shutil.rmtree(root / "bg-0.5_co_occur_obj-0.5" / "val")
    return root, [
        "missing folder",
        "no val/ folder under any bg-*_co_occur_obj-* folder",
        "restore '" + str(root / "bg-0.5_co_occur_obj-0.5/val") + "/'",
    ]


def uc_wrong_group_folder(root):
    d = root / "bg-0.5_co_occur_obj-0.5/test"
    (d / "obj-country_bg-urban_co_occur_obj-urban").rename(d / "obj-country_bg-urban_co-occur-obj-urban")
    return root, [
        "wrong folder name",
        "obj-country_bg-urban_co_occur_obj-urban/' not found, but",
        f"rename '{d / 'obj-country_bg-urban_co-occur-obj-urban'}' "
        f"to '{d / 'obj-country_bg-urban_co_occur_obj-urban'}'",
    ]


def uc_empty_group(root):
    d = root / "bg-0.5_co_occur_obj-0.5/val/obj-urban_bg-country_co_occur_obj-country"
    for f in d.glob("*.jpg"):
        f.rename(f.with_suffix(".png"))
    return root, [
        "empty folder",
        "obj-urban_bg-country_co_occur_obj-country/' holds no .jpg files (it has 00000.png",
        "UrbanCars images are .jpg",
    ]


def uc_parent_root(root):
    return root.parent, ["wrong folder", "has no bg-*_co_occur_obj-* folder, but", f"set dataset.root={root}"]


def uc_unreadable(root):
    _garbage(root / "bg-0.95_co_occur_obj-0.95/train/obj-urban_bg-urban_co_occur_obj-urban/00001.jpg")
    return root, ["unreadable image", "obj-urban_bg-urban_co_occur_obj-urban/00001.jpg"]


FAULTS = (
    [
        ("waterbirds", f)
        for f in (wb_missing_file, wb_unreadable, wb_missing_column, wb_bad_split, wb_wrong_root, wb_renamed_index)
    ]
    + [
        ("celeba", f)
        for f in (ca_missing_attr_file, ca_bad_partition, ca_wrong_image_folder, ca_unknown_attribute, ca_missing_image)
    ]
    + [
        ("metashift", f)
        for f in (ms_wrong_folder_name, ms_unreadable, ms_metadata_missing_column, ms_metadata_missing_file)
    ]
    + [
        ("urbancars", f)
        for f in (
            uc_wrong_ratio_folder,
            uc_missing_split,
            uc_wrong_group_folder,
            uc_empty_group,
            uc_parent_root,
            uc_unreadable,
        )
    ]
)


@pytest.mark.parametrize("name, fault", FAULTS, ids=[f.__name__ for _, f in FAULTS])
def test_datasets_check_names_each_planted_fault(tmp_path, capsys, name, fault):
    root = MAKERS[name](tmp_path)
    where, fragments = fault(root)
    where, extra = where if isinstance(where, tuple) else (where, {})
    sets = [f"--set=dataset.{k}={v}" for k, v in extra.items()]
    rc = main(["datasets", "check", name, "--root", str(where)] + sets)
    out = capsys.readouterr().out
    assert rc == 2, out
    for frag in fragments:
        assert frag in out, f"{frag!r} not in:\n{out}"
    assert "\nfix 1: " in out
    # a run fails the same way, before any training (preflight runs the same check)
    from exmap_ray.pipeline import preflight

    spec = from_dict(
        {
            "dataset": {"name": name, "root": str(where), "image_size": 32, "decode_cache": None, **extra},
            "model": {"backbone": "test_resnet"},
        }
    )
    with pytest.raises(DataError) as e:
        preflight(spec)
    assert fragments[0] in str(e.value) and "Fix: " in str(e.value)


@pytest.mark.parametrize("name", list(MAKERS))
def test_datasets_check_counts_a_good_dataset(tmp_path, capsys, name):
    root = MAKERS[name](tmp_path)
    assert main(["datasets", "check", name, "--root", str(root)]) == 0
    out = capsys.readouterr().out
    n = {"waterbirds": 48, "celeba": 48, "metashift": 64, "urbancars": 64}[name]
    assert f"OK: {n} images, layout as expected (every image opened)" in out
    report = check_dataset(dspec(name, root))
    assert report.ok and sum(sum(c.values()) for c in report.counts.values()) == n
    # a second check (every run's preflight) skips re-opening unchanged files; a changed file is opened again
    assert main(["datasets", "check", name, "--root", str(root)]) == 0
    assert "images verified by an earlier check" in capsys.readouterr().out
    first = sorted(root.rglob("*.jpg"))[0]
    first.write_bytes(b"garbage")
    assert main(["datasets", "check", name, "--root", str(root)]) == 2
    assert "unreadable image" in capsys.readouterr().out
    assert {
        "waterbirds": "waterbird on water",
        "celeba": "Blond_Hair=1 Male=1",
        "metashift": "cat indoor",
        "urbancars": "country car, country bg, country coobj",
    }[name] in out


def test_datasets_without_arguments_still_lists_names(capsys):
    assert main(["datasets"]) == 0
    out = capsys.readouterr().out
    for name in DATASETS.names():
        assert any(line.startswith(name + " ") and line.split(None, 1)[1] for line in out.splitlines()), out


# --------------------------------------------------------------------------- the shipped specs, end to end


def test_shipped_specs_carry_the_paper_settings():
    wb, ca, uc = (load_spec(SPECS / f"{n}.yaml") for n in ("waterbirds", "celeba", "urbancars"))
    assert (wb.heatmaps.downsize, ca.heatmaps.downsize, uc.heatmaps.downsize) == (112, 20, 56)
    for s in (wb, ca, uc, load_spec(SPECS / "metashift.yaml")):
        assert s.model.backbone == "resnet50" and s.model.pretrained and s.dataset.image_size == 224
        assert s.erm.optimizer == "sgd" and s.erm.lr_schedule == "cosine"
    assert (wb.erm.epochs, wb.erm.batch_size, ca.erm.epochs, ca.erm.batch_size) == (100, 32, 20, 100)


# The shipped specs end to end are heavier variants, run on demand (-m slow): their loaders are covered by
# the layout tests above, and the group_DRO layout's scan, image decoding and decode cache run end to end in
# every suite through the `folder` dataset (tests/test_e2e.py::test_run_folder_dataset_of_real_images)
@pytest.mark.parametrize(
    "name",
    [
        pytest.param("waterbirds", marks=pytest.mark.slow),
        pytest.param("celeba", marks=pytest.mark.slow),
        pytest.param("metashift", marks=pytest.mark.slow),
        pytest.param("urbancars", marks=pytest.mark.slow),
    ],
)
def test_shipped_spec_runs_end_to_end(ray_local, tmp_path, name):
    from exmap_ray.pipeline import run_pipeline

    root = MAKERS[name](tmp_path / "data")
    spec = load_spec(
        SPECS / f"{name}.yaml",
        [
            f"dataset.root={root}",
            "dataset.image_size=32",
            "dataset.loader_workers=0",
            f"dataset.decode_cache={tmp_path / 'decoded'}",
            "model.backbone=test_resnet",
            "model.pretrained=null",
            "erm.epochs=1",
            "erm.batch_size=16",
            "heatmaps.downsize=4",
            "heatmaps.batch_size=64",
            "heatmaps.shard_size=256",
            "heatmaps.num_actors=1",
            "clustering.min_group_size=2",
            "retrain.dfr.c_grid=[1.0]",
            "retrain.n_select_repeats=1",
            "retrain.dfr.n_final_fits=2",
        ]
        + (["clustering.k=2"] if name == "celeba" else []),
    )
    res = run_pipeline(spec, tmp_path / "out")
    true_groups = {"waterbirds": 4, "celeba": 4, "metashift": 4, "urbancars": 8}[name]
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    for row in ("erm", "robust", "oracle_dfr"):
        t = saved[row]["test"]
        assert len(t["per_group"]) == true_groups
        assert math.isfinite(t["worst_group_acc"]) and 0 <= t["worst_group_acc"] <= t["mean_acc"] <= 1
    assert res["robust"]["n_groups"] >= 2
    if name == "urbancars":
        for row in ("erm", "robust", "oracle_dfr"):
            g = saved[row]["test"]["shortcut_gaps"]
            assert all(math.isfinite(g[k]) for k in ("id_acc", "bg_gap", "co_occur_obj_gap", "both_gap"))
    else:
        assert "shortcut_gaps" not in saved["erm"]["test"]
    assert len(list((tmp_path / "decoded").glob("*.npy"))) == 2  # val and test decoded once, shared by all stages


def test_run_on_a_broken_dataset_stops_before_ray(tmp_path, capsys, monkeypatch):
    from exmap_ray import cli

    def tripwire(address):
        raise AssertionError("a broken dataset reached ray_session")

    monkeypatch.setattr(cli, "ray_session", tripwire)
    root = make_urbancars(tmp_path / "data")
    uc_wrong_group_folder(root)
    rc = main(
        [
            "run",
            str(SPECS / "urbancars.yaml"),
            "--out",
            str(tmp_path / "out"),
            "--set",
            f"dataset.root={root}",
            "--set",
            "model.pretrained=null",
            "--set",
            "model.backbone=test_resnet",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "wrong folder name: '" in err and "Fix: rename '" in err and "co-occur-obj-urban' to '" in err


def test_loader_options_and_erm_schedule_come_from_the_spec():
    from exmap_ray.data.base import loader_options
    from exmap_ray.erm import epoch_lr, make_optimizer

    d = from_dict({"dataset": {"loader_workers": 3, "pin_memory": True, "persistent_workers": True}}).dataset
    assert loader_options(d) == {"num_workers": 3, "pin_memory": True, "persistent_workers": True}
    assert loader_options(d, persistent=False)["persistent_workers"] is False  # one-pass loaders (features)
    auto = from_dict({"dataset": {"loader_workers": 0}}).dataset
    assert loader_options(auto) == {"num_workers": 0, "pin_memory": torch.cuda.is_available()}
    e = from_dict(
        {"erm": {"optimizer": "sgd", "lr": 0.003, "momentum": 0.9, "lr_schedule": "cosine", "epochs": 10}}
    ).erm
    assert [round(epoch_lr(e, i), 6) for i in (0, 5, 9)] == [
        0.003,
        0.0015,
        round(0.0015 * (1 + math.cos(0.9 * math.pi)), 6),
    ]
    opt = make_optimizer([torch.nn.Parameter(torch.zeros(1))], e)
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.9
    assert epoch_lr(from_dict({}).erm, 3) == from_dict({}).erm.lr  # the default: constant AdamW, as before


def test_missing_weights_stop_a_run_before_the_data_is_read(tmp_path, capsys, monkeypatch):
    from exmap_ray import cli

    monkeypatch.setattr(cli, "ray_session", lambda address: (_ for _ in ()).throw(AssertionError("reached Ray")))
    decoded = tmp_path / "decoded"
    rc = main(
        [
            "run",
            str(SPECS / "waterbirds.yaml"),
            "--out",
            str(tmp_path / "out"),
            "--set",
            f"dataset.root={make_waterbirds(tmp_path / 'data')}",
            "--set",
            f"dataset.decode_cache={decoded}",
            "--set",
            f"model.pretrained={tmp_path / 'hub' / 'models--timm--resnet50.tv_in1k'}",
        ]
    )
    err = capsys.readouterr().err
    assert (
        rc == 2 and (f"model.pretrained: '{tmp_path / 'hub' / 'models--timm--resnet50.tv_in1k'}' does not exist") in err
    )
    assert not decoded.exists()  # nothing was verified or decoded first
