"""Bad input, table-driven: every case names its culprit (key path, file, column, value), says what
is valid, and - for user errors - makes `exmap-ray` exit 2 without a traceback.

Everything here fails before Ray would start: `cli.ray_session` is replaced by a tripwire, so a
case that slipped past the checks fails loudly instead of launching a cluster. Real spec parsing,
real PNGs on disk, real timm models, real FAISS clustering, real DFR; tiny data, no Ray.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from exmap_ray import cli
from exmap_ray.groups import pseudo_groups
from exmap_ray.errors import DataError, SpecError, UserError
from exmap_ray.pipeline import preflight
from exmap_ray.retrain.dfr import MIN_GROUP_SIZE, fit_dfr
from exmap_ray.retrain import DfrKeys, RetrainConfig
from exmap_ray.spec import ClusteringSpec, load_spec

from ..conftest import make_folder_dataset, tiny_spec_dict

# --------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    """A bad input must be refused before any Ray work: reaching ray_session is a test failure."""

    def tripwire(address):
        raise AssertionError("bad input reached ray_session: it was not refused before Ray started")

    monkeypatch.setattr(cli, "ray_session", tripwire)


def write_spec(tmp: Path, spec) -> Path:
    path = tmp / "spec.yaml"
    path.write_text(spec if isinstance(spec, str) else yaml.safe_dump(spec))
    return path


def folder_spec(root: Path, **over) -> dict:
    return tiny_spec_dict(dataset={"name": "folder", "root": str(root), "image_size": 32}, **over)


def folder(tmp: Path, edit=None) -> Path:
    """A tiny real-PNG folder dataset (2 per group and split: 4 val images per class); `edit(rows)`
    rewrites metadata.csv, rows being lists of str [img_filename, y, split, place] after the header."""
    root = make_folder_dataset(tmp / "ds", per_group=2)
    if edit:
        header, *lines = (root / "metadata.csv").read_text().splitlines()
        rows = edit(header, [line.split(",") for line in lines])
        header, rows = rows if isinstance(rows, tuple) else (header, rows)
        (root / "metadata.csv").write_text("\n".join([header] + [",".join(r) for r in rows]) + "\n")
    return root


def _set(col: int, value: str, where=lambda r: True):
    return lambda header, rows: [r[:col] + [value] + r[col + 1 :] if where(r) else r for r in rows]


def corrupt_val_image(tmp: Path, data: bytes | None) -> Path:
    root = folder(tmp)
    img = root / "imgs" / "s1_y0_p0_0.png"
    img.write_bytes(data if data is not None else img.read_bytes()[:60])  # None: truncate a real PNG
    return root


# --------------------------------------------------------------------------- the CLI matrix
# Each row: prepare(tmp) -> spec (dict or YAML text) or (spec, ["key=value" for --set]); the expected UserError
# subclass; message fragments (formatted with tmp=tmp_path), each of which must appear.

CLI_CASES = [
    pytest.param(
        lambda t: "dataset:\n  name: cmnist\n  rho: [0.9\nseed: 0\n",
        SpecError,
        ["spec file '{tmp}/spec.yaml' is not valid YAML at line", "column"],
        id="malformed-yaml",
    ),
    pytest.param(
        lambda t: "- just\n- a list\n",
        SpecError,
        ["spec file '{tmp}/spec.yaml': the top level must be a mapping of keys, got list"],
        id="yaml-top-level-not-a-mapping",
    ),
    pytest.param(
        lambda t: tiny_spec_dict(clustering={"methd": "kmeans"}),
        SpecError,
        ["unknown spec key 'clustering.methd'", "Did you mean 'method'?", "Valid keys here: method,"],
        id="unknown-key-suggests-nearest",
    ),
    pytest.param(
        lambda t: tiny_spec_dict(erm={"epochs": "five"}),
        SpecError,
        ["spec key 'erm.epochs': got 'five', expected an integer"],
        id="wrong-type",
    ),
    pytest.param(
        lambda t: (tiny_spec_dict(), ["clustering.normalize=maybe"]),
        SpecError,
        ["spec key 'clustering.normalize': got 'maybe', expected true/false"],
        id="wrong-type-via-set",
    ),
    pytest.param(
        lambda t: tiny_spec_dict(clustering={"k": 1}),
        SpecError,
        ["spec key 'clustering.k': got 1, expected an integer >= 2, or 'auto'"],
        id="k-below-2",
    ),
    pytest.param(
        lambda t: folder_spec(folder(t), clustering={"method": "kmeans", "k": 5, "scope": "local"}),
        SpecError,
        [
            "spec key 'clustering.k': 5 clusters but the local scope (class 0) has only 4 val points",
            "an integer in 2..4, or 'auto'",
        ],
        id="k-above-class-val-count-local",
    ),
    pytest.param(
        lambda t: tiny_spec_dict(dataset={"rho": 1.5}),
        SpecError,
        ["spec key 'dataset.rho': got 1.5, expected a number in [0, 1]"],
        id="rho-above-1",
    ),
    pytest.param(
        lambda t: tiny_spec_dict(dataset={"rho": -0.1}),
        SpecError,
        ["spec key 'dataset.rho': got -0.1, expected a number in [0, 1]"],
        id="rho-below-0",
    ),
    pytest.param(
        lambda t: tiny_spec_dict(erm={"lr": -0.001}),
        SpecError,
        ["spec key 'erm.lr': got -0.001, expected a number > 0"],
        id="negative-lr",
    ),
    pytest.param(
        lambda t: folder_spec(t / "nope"),
        DataError,
        ["dataset.root '{tmp}/nope' does not exist", "Fix: set dataset.root to the folder that holds metadata.csv"],
        id="missing-dataset-root",
    ),
    pytest.param(
        lambda t: tiny_spec_dict(dataset={"name": "folder"}),
        SpecError,
        ["spec key 'dataset.root' is required for dataset.name 'folder'"],
        id="folder-without-root",
    ),
    pytest.param(
        lambda t: folder_spec(folder(t, lambda h, rows: (h.replace("split", "fold"), rows))),
        DataError,
        [
            "missing column: '{tmp}/ds/metadata.csv' has no column 'split'",
            "(its header: img_filename, y, fold, place)",
            "it needs the columns img_filename, y, split, ",
        ],
        id="metadata-missing-column",
    ),
    pytest.param(
        lambda t: folder_spec(folder(t, _set(2, "7", lambda r: r[0].endswith("s0_y1_p0_1.png")))),
        DataError,
        [
            "bad split value: '{tmp}/ds/metadata.csv' column 'split': line",
            "has '7'",
            "to 0 (train), 1 (val) or 2 (test)",
        ],
        id="metadata-unknown-split-value",
    ),
    pytest.param(
        lambda t: folder_spec(folder(t, _set(1, "bird"))),
        DataError,
        ["metadata.csv' column 'y': line 2 has 'bird'", "to an integer >= 0"],
        id="metadata-non-integer-y",
    ),
    pytest.param(
        lambda t: folder_spec(corrupt_val_image(t, b"\x00garbage, not a PNG\xff" * 8)),
        DataError,
        [
            "unreadable image: 1 file(s) cannot be read as images: '{tmp}/ds/imgs/s1_y0_p0_0.png'",
            "delete them and their rows/entries from the index",
        ],
        id="corrupt-image-garbage-bytes",
    ),
    pytest.param(
        lambda t: folder_spec(corrupt_val_image(t, None)),
        DataError,
        ["unreadable image: 1 file(s) cannot be read as images: '{tmp}/ds/imgs/s1_y0_p0_0.png'"],
        id="corrupt-image-truncated-png",
    ),
    pytest.param(
        lambda t: folder_spec(folder(t, lambda h, rows: [r for r in rows if r[2] != "2"])),
        DataError,
        ["metadata.csv': the test split (split == 2) is empty"],
        id="empty-split",
    ),
    pytest.param(
        lambda t: folder_spec(folder(t, _set(1, "0"))),
        DataError,
        ["metadata.csv': the train split has a single class (column 'y' is 0", "a classifier needs at least two"],
        id="single-class-dataset",
    ),
    pytest.param(
        lambda t: folder_spec(folder(t, _set(1, "1", lambda r: r[2] == "1"))),
        DataError,
        ["metadata.csv': the val split has a single class (column 'y' is 1 on every split == 1 row)"],
        id="single-class-val-split",
    ),
    pytest.param(
        lambda t: tiny_spec_dict(dataset={"n_val": 100, "rho": 0.99}),
        DataError,
        ["dataset 'cmnist': true group 'y<5 green' has 1 val member(s)", "needs at least 2 per group", "dataset.n_val"],
        id="true-val-group-of-one",
    ),
    pytest.param(
        lambda t: tiny_spec_dict(model={"backbone": "resnet_nope"}),
        SpecError,
        ["spec key 'model.backbone': 'resnet_nope' is not a timm model", "Close names:"],
        id="unknown-timm-backbone",
    ),
    pytest.param(
        lambda t: tiny_spec_dict(model={"pretrained": str(t / "weights.pt")}),
        UserError,
        ["model.pretrained: '{tmp}/weights.pt' does not exist"],
        id="missing-pretrained-weights",
    ),
    pytest.param(
        lambda t: tiny_spec_dict(heatmaps={"method": "lrpp"}),
        SpecError,
        [
            "spec key 'heatmaps.method': unknown heatmap method 'lrpp'",
            "Registered: gradcam, input_x_gradient,",
            "Did you mean 'lrp'?",
        ],
        id="unknown-heatmap-method",
    ),
    pytest.param(
        lambda t: tiny_spec_dict(clustering={"method": "kmean"}),
        SpecError,
        ["spec key 'clustering.method': unknown clusterer 'kmean'. Registered:", "spectral", "Did you mean 'kmeans'?"],
        id="unknown-clustering-method",
    ),
    pytest.param(
        lambda t: tiny_spec_dict(dataset={"name": "cmnst"}),
        SpecError,
        ["spec key 'dataset.name': unknown dataset 'cmnst'", "Registered: celeba, cmnist,", "Did you mean 'cmnist'?"],
        id="unknown-dataset-name",
    ),
]


@pytest.mark.parametrize("prepare, error, fragments", CLI_CASES)
def test_bad_input_is_named_and_exits_2(tmp_path, capsys, prepare, error, fragments):
    made = prepare(tmp_path)
    spec, sets = made if isinstance(made, tuple) else (made, [])
    path = write_spec(tmp_path, spec)
    want = [f.format(tmp=tmp_path) for f in fragments]

    # in-process: the right kind of UserError, with every fragment, from the checks `run` does first
    with pytest.raises(UserError) as e:
        preflight(load_spec(path, sets))
    assert type(e.value) is error, f"{type(e.value).__name__}: {e.value}"
    for frag in want:
        assert frag in str(e.value)

    # the CLI: exit 2, one line naming the culprit, no traceback
    rc = cli.main(["run", str(path), "--out", str(tmp_path / "out"), *(a for kv in sets for a in ("--set", kv))])
    out = capsys.readouterr()
    assert rc == 2, out.err
    # the error is the last line (a stage may log what it did before, e.g. decoding images once)
    assert out.err.strip().splitlines()[-1].startswith("exmap-ray: error: ")
    assert "Traceback" not in out.err + out.out
    for frag in want:
        assert frag in out.err
    assert not (tmp_path / "out").exists()  # nothing was started


def test_console_script_exits_2_without_traceback(tmp_path):
    """The real entry point (a fresh interpreter), not just `main()`: exit status 2, message, no traceback."""
    path = write_spec(tmp_path, tiny_spec_dict(clustering={"scope": "globl"}))
    script = Path(sys.executable).with_name("exmap-ray")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "exmap_ray"]
    proc = subprocess.run(
        cmd + ["run", str(path), "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2, proc.stderr
    assert "spec key 'clustering.scope': got 'globl', expected 'local' | 'global'" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()


@pytest.mark.parametrize("exc", [UserError, SpecError, DataError])
def test_any_user_error_exits_2_and_bugs_keep_their_traceback(monkeypatch, capsys, exc):
    """Generic: whatever raises a UserError subclass, at any depth, becomes exit 2 plus its message."""

    def failing(args):
        raise exc("the culprit is X; valid is Y")

    monkeypatch.setattr(cli, "cmd_spec", failing)
    assert cli.main(["spec"]) == 2
    err = capsys.readouterr().err
    assert err == "exmap-ray: error: the culprit is X; valid is Y\n"

    def buggy(args):
        raise RuntimeError("a bug in exmap-ray")

    monkeypatch.setattr(cli, "cmd_spec", buggy)
    with pytest.raises(RuntimeError, match="a bug in exmap-ray"):  # not swallowed: bugs keep a traceback
        cli.main(["spec"])


# --------------------------------------------------------------------------- core level: dead heatmaps


def _heatmaps(n=300, seed=0):
    return np.random.default_rng(seed).normal(size=(n, 3, 7, 7)).astype(np.float32)


def _dead(kind):
    H = _heatmaps()
    if kind == "all-zero":
        return np.zeros_like(H)
    if kind == "all-nan":
        return np.full_like(H, np.nan)
    if kind == "one-nan":
        H[17, 1, 3, 3] = np.nan
        return H
    H[:5, 0, 0, 0] = np.inf  # "some-inf"
    return H


@pytest.mark.parametrize(
    "kind, fragments",
    [
        ("all-zero", ["all 300 heatmaps are all zero", "ERM collapsed", "dead model", "heatmaps.method"]),
        ("all-nan", ["300 of 300 heatmaps contain NaN or inf", "ERM diverged", "erm.lr", "heatmaps.method"]),
        ("one-nan", ["1 of 300 heatmaps contain NaN or inf"]),
        ("some-inf", ["5 of 300 heatmaps contain NaN or inf"]),
    ],
    ids=["all-zero", "all-nan", "one-nan", "some-inf"],
)
@pytest.mark.parametrize("scope", ["local", "global"])
def test_dead_model_heatmaps_are_refused(kind, fragments, scope):
    y = np.repeat([0, 1], 150)
    cs = ClusteringSpec(method="kmeans", k=2, scope=scope)
    with pytest.raises(DataError) as e:
        pseudo_groups(_dead(kind), y, cs, seed=0)
    for frag in fragments:
        assert frag in str(e.value)
    # sanity: the same shapes with live heatmaps cluster fine
    groups, info = pseudo_groups(_heatmaps(), y, cs, seed=0)
    assert len(groups) == 300 and info["n_groups"] >= 2


def test_partly_zero_heatmaps_are_allowed():
    """Only *every* heatmap being zero is a dead model; a few blank explanations are data."""
    H = _heatmaps()
    H[:10] = 0
    groups, _ = pseudo_groups(H, np.repeat([0, 1], 150), ClusteringSpec(method="kmeans", k=2, scope="global"), 0)
    assert len(groups) == 300


# --------------------------------------------------------------------------- core level: tiny groups


def _outlier_data():
    """Class 0: 20 points near the origin plus 1 far outlier; class 1: two blobs of 20."""
    rng = np.random.default_rng(0)
    X = np.concatenate(
        [
            rng.normal(0, 0.1, (20, 4)),
            [[9.0, 9.0, 9.0, 9.0]],
            rng.normal(0, 0.1, (20, 4)) + [5, 0, 0, 0],
            rng.normal(0, 0.1, (20, 4)) + [0, 5, 0, 0],
        ]
    )
    y = np.array([0] * 21 + [1] * 40)
    return X.astype(np.float32), y


def test_small_pseudo_groups_merge_before_dfr_as_documented():
    """clustering.min_group_size (default 5) merges fragments into their class's nearest group, so DFR
    never sees them; the merge is recorded in the clustering info."""
    X, y = _outlier_data()
    cs = ClusteringSpec(method="kmeans", k=2, scope="local", normalize=False)
    assert cs.min_group_size == 5
    groups, info = pseudo_groups(X, y, cs, seed=0)
    assert info["merged"] == [
        {"class": 0, "cluster": info["merged"][0]["cluster"], "size": 1, "into": info["merged"][0]["into"]}
    ]
    assert min(info["sizes"]) >= cs.min_group_size and sorted(info["sizes"]) == [20, 20, 21]
    model = fit_dfr(X, y, groups, RetrainConfig(DfrKeys(c_grid=[1.0], n_final_fits=2), n_select_repeats=2), seed=0)
    assert set(model.classes) == {0, 1}


def test_dfr_refuses_a_group_smaller_than_its_balanced_fits_need():
    """With merging turned off (min_group_size 1) the 1-point fragment survives; DFR names it."""
    X, y = _outlier_data()
    groups, info = pseudo_groups(
        X, y, ClusteringSpec(method="kmeans", k=2, scope="local", normalize=False, min_group_size=1), seed=0
    )
    assert info["merged"] == [] and 1 in info["sizes"]
    lonely = int(np.argmin(info["sizes"]))
    with pytest.raises(UserError) as e:
        fit_dfr(X, y, groups, RetrainConfig(DfrKeys()), seed=0)
    msg = str(e.value)
    assert f"DFR: group {lonely} has 1 val member(s)" in msg
    assert f"need at least {MIN_GROUP_SIZE} per group" in msg and "clustering.min_group_size" in msg


@pytest.mark.parametrize("size, ok", [(1, False), (2, True)], ids=["group-of-1-refused", "group-of-2-fits"])
def test_dfr_minimum_group_size_boundary(size, ok):
    rng = np.random.default_rng(0)
    y = np.array([0] * 30 + [1] * (30 + size))
    groups = np.array([0] * 30 + [1] * 30 + [2] * size)
    X = rng.normal(size=(len(y), 5)) + y[:, None]
    dspec = RetrainConfig(DfrKeys(c_grid=[1.0, 0.1], n_final_fits=2), n_select_repeats=2)
    if ok:
        assert MIN_GROUP_SIZE == 2
        model = fit_dfr(X, y, groups, dspec, seed=0)
        assert model.predict(X).shape == y.shape
    else:
        with pytest.raises(UserError, match=r"group 2 has 1 val member\(s\).*at least 2 per group"):
            fit_dfr(X, y, groups, dspec, seed=0)
