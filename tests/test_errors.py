"""The near-name helpers every "not found, did you mean" message uses."""

from exmap_ray.errors import did_you_mean, near_name, near_names


def test_the_same_name_in_another_case_comes_first():
    assert near_name("metadata.csv", ["metadata_old.csv", "Metadata.csv"]) == "Metadata.csv"
    assert near_names("Resnet18", ["resnet18", "resnet10", "resnet14"], n=3)[0] == "resnet18"


def test_close_names_best_first_and_nothing_when_none_is_near():
    assert near_names("resnt18", ["resnet18", "resnet101", "vgg11"], n=2) == ["resnet18", "resnet101"]
    assert near_name("zzzz", ["cmnist", "folder"]) is None and near_names("zzzz", []) == []
    assert near_name(3, ["3", "4"]) == "3"  # non-string names (a spec value) are compared as text


def test_did_you_mean_wording():
    assert did_you_mean("kk", ["method", "k", "scope"]) == " Did you mean 'k'?"
    assert did_you_mean("zzzz", ["method", "k"]) == ""
