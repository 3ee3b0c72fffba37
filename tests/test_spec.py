import dataclasses

import pytest

from exmap_ray.errors import SpecError
from exmap_ray.hashing import stable_hash, stage_seed
from exmap_ray.spec import describe_defaults, from_dict, load_spec, parse_overrides


def test_defaults_and_reasons():
    spec = from_dict({})
    assert spec.dataset.name == "cmnist" and spec.clustering.k == "auto"
    text = describe_defaults()
    assert 'clustering.k = "auto"' in text and "eigengap" in text


@pytest.mark.parametrize(
    "data, fragment",
    [
        ({"clustering": {"kk": 3}}, "unknown spec key 'clustering.kk'. Did you mean 'k'?"),
        ({"datset": {}}, "unknown spec key 'datset'. Did you mean 'dataset'?"),
        ({"erm": {"epochs": "five"}}, "spec key 'erm.epochs': got 'five', expected an integer"),
        ({"erm": {"lr": -0.1}}, "spec key 'erm.lr': got -0.1, expected a number > 0"),
        ({"dataset": {"rho": 1.5}}, "spec key 'dataset.rho': got 1.5, expected a number in [0, 1]"),
        ({"clustering": {"k": 1}}, "spec key 'clustering.k': got 1, expected an integer >= 2, or 'auto'"),
        ({"clustering": {"scope": "galaxy"}}, "spec key 'clustering.scope': got 'galaxy', expected 'local' | 'global'"),
        ({"resources": {"gpu": "maybe"}}, "spec key 'resources.gpu'"),
        ({"erm": {"use_gpu": True}}, "use 'resources.gpu' instead"),
        ({"retrain": {"dfr": {"c_grid": []}}}, "spec key 'retrain.dfr.c_grid': got [], expected a non-empty list"),
        ({"retrain": {"jtt": {"upweight": 0.5}}}, "spec key 'retrain.jtt.upweight': got 0.5, expected a number >= 1"),
        ({"dataset": {"name": "celeba", "target": 3}}, "spec key 'dataset.target': got 3, expected a string or null"),
        (
            {"retrain": {"dfr": {"whole_group_max": -1}}},
            "spec key 'retrain.dfr.whole_group_max': got -1, expected a number >= 0",
        ),
        (
            {"retrain": {"dfr": {"balance": "upsample"}}},
            "spec key 'retrain.dfr.balance': got 'upsample', expected 'subsample' | 'reweight'",
        ),
        ({"erm": 3}, "spec key 'erm': expected a mapping"),
    ],
)
def test_bad_spec_names_the_key(data, fragment):
    with pytest.raises(SpecError) as e:
        from_dict(data)
    assert fragment in str(e.value)


def test_yaml_then_set_precedence(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("seed: 3\nclustering:\n  k: 4\n")
    spec = load_spec(p, ["clustering.k=6", "retrain.dfr.c_grid=[1, 0.5]", "model.pretrained=null"])
    assert spec.seed == 3 and spec.clustering.k == 6 and spec.retrain.dfr.c_grid == [1.0, 0.5]
    assert parse_overrides(["a.b.c=x"]) == {"a": {"b": {"c": "x"}}}


def test_malformed_yaml_and_missing_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("seed: 1\nclustering: [unclosed\n")
    with pytest.raises(SpecError, match=r"bad.yaml' is not valid YAML at line \d+"):
        load_spec(p)
    with pytest.raises(SpecError, match="does not exist"):
        load_spec(tmp_path / "nope.yaml")
    with pytest.raises(SpecError, match="expected key.path=value"):
        load_spec(None, ["clustering.k"])


def test_hashes_are_stable_and_order_free():
    """Pinned values: stage keys and seeds must not drift between versions (cached stages, results)."""
    assert stable_hash({"a": 1, "b": 2}) == stable_hash({"b": 2, "a": 1}) == "d8497d9d8277"
    assert (stage_seed(0, "erm"), stage_seed(0, "dfr")) == (1698917491, 2104046090)


def test_base_key_errors_name_the_file(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("base: missing.yaml\n")
    with pytest.raises(SpecError, match=r"key 'base' names 'missing.yaml', but '.*missing.yaml' does not exist"):
        load_spec(a)
    a.write_text("base: b.yaml\n")
    b.write_text("base: a.yaml\n")
    with pytest.raises(SpecError, match="a cycle"):
        load_spec(a)
    a.write_text("base: [1]\n")
    with pytest.raises(SpecError, match="key 'base' must be the path"):
        load_spec(a)
    b.write_text("seed: 3\nclustering: {k: 4, scope: local}\n")
    a.write_text("base: b.yaml\nclustering: {k: 2}\n")
    s = load_spec(a)
    assert s.seed == 3 and s.clustering.k == 2 and s.clustering.scope == "local"  # this file over its base


def test_spec_command_without_a_spec_shows_the_built_in_defaults(capsys):
    """`exmap-ray spec` alone: every key with its built-in default and reason; with --set, those defaults
    overridden (as YAML). (`run` without a spec runs the demo instead: test_shipped_specs.)"""
    import yaml

    from exmap_ray import cli

    assert cli.main(["spec"]) == 0
    out = capsys.readouterr().out
    assert out.strip() == describe_defaults().strip()
    assert '  clustering.scope = "local"    # local = cluster each class apart' in out
    assert cli.main(["spec", "--set", "seed=3"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == from_dict({"seed": 3}).to_dict()


@pytest.mark.parametrize(
    "old, value, new",
    [
        ("dfr.c_grid", [1.0], "retrain.dfr.c_grid"),
        ("dfr.n_final_fits", 3, "retrain.dfr.n_final_fits"),
        ("dfr.n_select_repeats", 3, "retrain.n_select_repeats"),
        ("retrain.groupdro_eta", 0.1, "retrain.groupdro.eta"),
        ("retrain.groupdro_epochs", 3, "retrain.groupdro.epochs"),
        ("retrain.lr", 0.1, "retrain.groupdro.lr"),
        ("retrain.jtt_upweight", 50.0, "retrain.jtt.upweight"),
        ("retrain.weight_decay_grid", [0.1], "retrain.groupdro.weight_decay_grid' and 'retrain.jtt.weight_decay_grid"),
        ("retrain.batch_size", 32, "retrain.groupdro.batch_size' (last layer) and 'retrain.end_to_end.batch_size"),
        ("retrain.e2e_lr", 0.1, "retrain.end_to_end.lr"),
        ("retrain.e2e_weight_decay", 0.1, "retrain.end_to_end.weight_decay"),
        ("retrain.e2e_epochs", 2, "retrain.end_to_end.epochs"),
    ],
)
def test_an_old_key_names_its_new_place_in_a_file_and_in_set(tmp_path, old, value, new):
    """Each key that moved when the plugins took their sections stops with the new key, however given."""
    import yaml

    from exmap_ray.search import unflatten

    want = f"spec key '{old}' has moved: use '{new}' instead"
    p = tmp_path / "old.yaml"
    p.write_text(yaml.safe_dump(unflatten({old: value})))
    for args in ((p, None), (None, [f"{old}={value}"])):
        with pytest.raises(SpecError) as e:
            load_spec(*args)
        assert want in str(e.value)
    first = new.split("'")[0]  # the new key (the first, where there are two) takes the value
    assert load_spec(None, [f"{first}={value}"]).flat()[first] == pytest.approx(value)


def test_a_key_of_another_dataset_names_who_takes_it_and_what_this_one_takes():
    with pytest.raises(SpecError) as e:
        from_dict({"dataset": {"name": "celeba", "rho": 0.9}})
    msg = str(e.value)
    assert "spec key 'dataset.rho' is not a key of dataset 'celeba': dataset(s) cmnist, cmnist_multi, zoo_" in msg
    assert "Dataset 'celeba' takes root, target, spurious, besides the keys every dataset takes: name," in msg
    with pytest.raises(
        SpecError,
        match="'dataset.rho_patch' is not a key of dataset 'cmnist': dataset.s. cmnist_multi, zoo_frame_patch take it",
    ):
        from_dict({"dataset": {"rho_patch": 0.8}})  # the default dataset, cmnist
    assert from_dict({"dataset": {"name": "cmnist_multi", "rho_patch": 0.8}}).dataset.rho_patch == 0.8


def test_a_dataset_section_holds_the_common_keys_and_the_chosen_datasets_own():
    cm, cb = from_dict({}).dataset, from_dict({"dataset": {"name": "celeba", "root": "/d"}}).dataset
    assert {"rho", "n_val", "image_size"} <= set(dataclasses.asdict(cm)) and not hasattr(cm, "root")
    assert {"root", "target", "image_size"} <= set(dataclasses.asdict(cb)) and not hasattr(cb, "rho")
    assert cb.root == "/d" and cb.target is None


def test_plugin_sections_survive_pickling_copying_and_replace():
    """Ray ships specs to tasks and trials: the made-at-run-time section classes travel through the registry."""
    import copy
    import pickle

    spec = load_spec("celeba", ["retrain.jtt.upweight=50", "dataset.target=Smiling"])
    for again in (pickle.loads(pickle.dumps(spec)), copy.deepcopy(spec)):
        assert again == spec and again.retrain.jtt.upweight == 50.0 and again.dataset.target == "Smiling"
    r = dataclasses.replace(spec.retrain, method="jtt", mode="end_to_end")
    assert type(r) is type(spec.retrain) and r.jtt == spec.retrain.jtt


def test_spec_command_shows_every_plugin_section_with_its_reasons():
    """`exmap-ray spec`: each retrainer's section and each dataset's own keys, every key with a reason."""
    from exmap_ray.data import DATASETS
    from exmap_ray.retrain import RETRAINERS

    text = describe_defaults()
    for name in RETRAINERS.names():
        keys = RETRAINERS.get(name).keys
        for f in dataclasses.fields(keys):
            line = next(ln for ln in text.splitlines() if ln.startswith(f"  retrain.{name}.{f.name} = "))
            assert f.metadata["why"] in line
    for name in DATASETS.names():
        keys = DATASETS.get(name).keys
        for f in dataclasses.fields(keys) if keys else ():
            line = next(
                ln
                for ln in text.splitlines()  # datasets may share a key name, with their own reasons
                if ln.startswith(f"  dataset.{f.name} = ") and f.metadata["why"] in ln
            )
            assert name in line.split("#", 1)[1]


def test_resuming_a_run_or_sweep_started_before_keys_moved_says_what_to_do(tmp_path, capsys):
    """A run or sweep folder whose saved spec has old keys: --resume stops, naming them and the way on."""
    import json

    from exmap_ray import cli
    from exmap_ray.errors import UserError
    from exmap_ray.storage import Loc
    from exmap_ray.tune import _check_searched_keys

    run = tmp_path / "run"
    run.mkdir()
    (run / "spec.resolved.json").write_text(json.dumps({"name": "cmnist", "dfr": {"c_grid": [1.0]}}))
    assert cli.main(["run", "cmnist", "--out", str(run), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "was started before spec keys moved (dfr.c_grid" in err and "drop --resume" in err
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "spec.resolved.json").write_text(json.dumps({"search": {"space": {"dfr.c_grid": {"grid": [[1.0]]}}}}))
    with pytest.raises(UserError, match=r"searched dfr.c_grid, which moved \(dfr.c_grid -> retrain.dfr.c_grid\)"):
        _check_searched_keys(Loc.parse(sweep), [])
