"""The specs that ship with the package: found by name, the demo without one, every one valid.

They live in exmap_ray/specs/ (package data); the repository's tune_specs/<name>.yaml each name
theirs through `base:`, so both spellings give the same spec.
"""

from pathlib import Path

import pytest
import yaml

from exmap_ray.cli import build_parser, job_spec
from exmap_ray.errors import SpecError
from exmap_ray.spec import DEMO, SHIPPED, Spec, find_spec, load_spec, shipped_specs

NAMES = shipped_specs()
REPO_SPECS = Path(__file__).resolve().parents[1] / "tune_specs"


def test_the_shipped_specs_are_the_ones_the_docs_name():
    assert {
        "cmnist",
        "cmnist_multi",
        "folder",
        "waterbirds",
        "celeba",
        "metashift",
        "urbancars",
        "cmnist_sweep",
        "waterbirds_sweep",
        "cmnist_e2e_sweep",
    } <= set(NAMES)
    assert DEMO == "cmnist" and DEMO in NAMES


@pytest.mark.parametrize("name", NAMES)
def test_each_shipped_spec_loads_and_validates_by_name(name):
    assert find_spec(name) == SHIPPED / f"{name}.yaml"
    spec = load_spec(name)
    assert isinstance(spec, Spec)
    assert spec.to_dict() == load_spec(SHIPPED / f"{name}.yaml").to_dict()  # a name is its file
    stub = REPO_SPECS / f"{name}.yaml"  # the repository path gives the same spec
    assert stub.is_file() and load_spec(stub).to_dict() == spec.to_dict()


def test_a_name_with_set_resolves_the_shipped_spec_and_its_base():
    spec = load_spec("waterbirds", ["dataset.root=/data/waterbird_complete95_forest2water2"])
    assert spec.dataset.name == "waterbirds" and spec.dataset.root == "/data/waterbird_complete95_forest2water2"
    sweep = load_spec("waterbirds_sweep")  # `base: waterbirds.yaml`, next to it in the package
    assert sweep.search.space and sweep.model == spec.model and sweep.erm == spec.erm


def test_a_file_wins_over_a_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cmnist").write_text("seed: 7\n")
    assert find_spec("cmnist") == Path("cmnist") and load_spec("cmnist").seed == 7


@pytest.mark.parametrize(
    "ref, near", [("cmnst", "cmnist"), ("waterbird", "waterbirds"), ("cmnist-sweep", "cmnist_sweep")]
)
def test_an_unknown_name_lists_the_shipped_specs_and_a_near_one(ref, near):
    with pytest.raises(SpecError) as e:
        load_spec(ref)
    msg = str(e.value)
    assert f"unknown spec '{ref}'" in msg and f"Did you mean '{near}'?" in msg
    assert f"Shipped specs: {', '.join(NAMES)}" in msg


def test_a_name_near_nothing_still_lists_the_shipped_specs():
    with pytest.raises(SpecError) as e:
        load_spec("zzzz")
    assert "Did you mean" not in str(e.value) and ", ".join(NAMES) in str(e.value)


def test_a_missing_file_suggests_the_shipped_name(tmp_path):
    with pytest.raises(SpecError) as e:
        load_spec(tmp_path / "cmnist_multi.yaml")
    msg = str(e.value)
    assert "does not exist. Did you mean 'cmnist_multi'? Shipped specs, named without a folder" in msg


@pytest.mark.parametrize("command", ["run", "tune", "bench"])
def test_no_spec_is_the_demo(command):
    spec = job_spec(build_parser().parse_args([command]))
    assert spec.to_dict() == load_spec(SHIPPED / "cmnist.yaml").to_dict()
    assert spec.name == "cmnist" and spec.clustering.scope == "global"  # not the defaults' local scope
    with_set = job_spec(build_parser().parse_args([command, "--set", "seed=3"]))
    assert with_set.seed == 3 and with_set.dataset == spec.dataset


def test_every_sweep_spec_loads_and_parses():
    """Each shipped sweep: a header comment, a search space of several trials, its base's settings."""
    from exmap_ray.search import n_trials, parse_space

    sweeps = sorted(SHIPPED.glob("*_sweep.yaml"))
    names = {p.name for p in sweeps}
    assert {
        "cmnist_sweep.yaml",
        "cmnist_multi_sweep.yaml",
        "waterbirds_sweep.yaml",
        "celeba_sweep.yaml",
        "metashift_sweep.yaml",
        "urbancars_sweep.yaml",
    } <= names
    for p in sweeps:
        assert p.read_text().startswith("# "), f"{p.name} needs a header saying what it searches and why"
        spec = load_spec(p)
        assert n_trials(parse_space(spec), spec.search.num_samples) >= 4, p.name
        base_name = yaml.safe_load(p.read_text()).get("base")
        assert base_name, f"{p.name} should take its settings from its spec through base:, not copy them"
        base = load_spec(SHIPPED / base_name)
        assert spec.dataset == base.dataset and spec.model == base.model and spec.erm == base.erm, p.name
    assert load_spec(SHIPPED / "waterbirds_sweep.yaml").model.backbone == "resnet50"
