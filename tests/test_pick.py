"""`groups.pick_among`: a small label-free sweep inside `exmap-ray run`, on the shared upstream."""

import pytest

from exmap_ray.errors import SpecError
from exmap_ray.pipeline import run_pipeline
from exmap_ray.spec import from_dict, pick_variants

from .conftest import tiny_spec_dict

ENTRIES = [{}, {"clustering.input": "both"}, {"clustering.input": "both", "groups.merge_easy": True}]


def test_entries_are_checked_when_the_spec_is_read():
    spec = from_dict(tiny_spec_dict(groups={"pick_among": ENTRIES}))
    labels = [label for label, _ in pick_variants(spec)]
    assert labels == ["as specified", "clustering.input=both", "clustering.input=both,groups.merge_easy=True"]
    assert all(v.groups.pick_among == [] for _, v in pick_variants(spec))
    for entries, says in [
        ([{"dataset.rho": 0.5}], "entry 0 sets dataset.rho"),
        ([{}, {"groups.source": "features"}], "entry 1 sets groups.source"),
        ([{"clustering.input": "bogus"}], r"'groups.pick_among\[0\]'.*'clustering.input'"),
        ([{"clustering.kk": 2}], r"'groups.pick_among\[0\]'.*Did you mean 'k'"),
    ]:
        with pytest.raises(SpecError, match=says):
            from_dict(tiny_spec_dict(groups={"pick_among": entries}))
    # an end-to-end fine-tune keeps the spec's own groups (one fine-tune per entry is not made): still valid
    from_dict(tiny_spec_dict(groups={"pick_among": ENTRIES}, retrain={"mode": "end_to_end", "method": "jtt"}))


def test_run_keeps_the_label_free_choice_and_reports_every_candidate(tiny_run, tmp_path):
    cache = tiny_run[0] / "cache"
    spec = from_dict(tiny_spec_dict(groups={"pick_among": ENTRIES}))
    res = run_pipeline(spec, tmp_path / "pick", cache)
    pick = res["robust"]["pick"]
    assert [c["entry"] for c in pick["candidates"]] == [label for label, _ in pick_variants(spec)]
    assert pick["chosen"] in [c["entry"] for c in pick["candidates"]]
    assert pick["metric"] == spec.search.metric and all(c["selection_metric"] is not None for c in pick["candidates"])
    # the robust row is the chosen entry's, exactly as a run with that entry's keys set gives it
    (_, chosen), *_ = [(lab, v) for lab, v in pick_variants(spec) if lab == pick["chosen"]]
    alone = run_pipeline(chosen, tmp_path / "alone", cache)
    assert res["robust"]["test"] == alone["robust"]["test"]
    assert res["robust"]["n_groups"] == alone["robust"]["n_groups"]
    mine = next(c for c in pick["candidates"] if c["entry"] == pick["chosen"])
    assert mine["test_worst_group_acc"] == res["robust"]["test"]["worst_group_acc"]
    # the run's table names the choice and every candidate's label-free score
    from exmap_ray.pipeline import format_table

    table = format_table(res)
    assert f"chose '{pick['chosen']}'" in table and pick["metric"] in table
    assert all(f"{c['entry']} {c['selection_metric']:.3f}" in table for c in pick["candidates"])
