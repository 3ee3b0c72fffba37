"""`exmap-ray bench --zoo`: the protocol file, the summary maths, and one tiny family end to end on a real Ray."""

import json
import math

import pytest

from exmap_ray.bench_zoo import (
    ORACLE,
    PICK_VARIANTS,
    SHIPPED_ROW,
    choose_families,
    choose_seeds,
    parse_variant,
    protocol,
    run_zoo,
    summarize,
)
from exmap_ray.errors import UserError
from exmap_ray.spec import SHIPPED, load_spec, pick_variants, shipped_specs

TINY = [
    "dataset.n_train=300",
    "dataset.n_val=300",
    "dataset.n_test=200",
    "dataset.image_size=16",
    "model.backbone=test_resnet",
    "erm.epochs=1",
    "erm.batch_size=64",
    "heatmaps.downsize=4",
    "heatmaps.num_actors=1",
    "heatmaps.shard_size=150",
    "retrain.n_select_repeats=2",
    "retrain.dfr.c_grid=[1.0, 0.1]",
    "retrain.dfr.n_final_fits=3",
    "resources.worker_cpus=1",
]


def test_the_protocol_fixes_disjoint_seeds_and_ships_every_family():
    p = protocol()
    assert set(p["dev_seeds"]).isdisjoint(p["judge_seeds"]) and len(p["judge_seeds"]) >= 3
    # every later judge set is fresh: each seed set is disjoint from every other
    sets = {k: set(v) for k, v in p.items() if k.endswith("_seeds")}
    assert {"judge2_seeds", "judge3_seeds", "judge4_seeds", "judge5_seeds"} <= set(sets)
    for a in sets:
        for b in sets:
            assert a == b or not sets[a] & sets[b], (a, b)
    assert choose_seeds("judge2", p, quick=False) == p["judge2_seeds"]
    assert choose_seeds("judge3", p, quick=False) == p["judge3_seeds"] == [27, 28, 29]
    assert choose_seeds("judge4", p, quick=False) == [30, 31, 32]
    assert choose_seeds("judge5", p, quick=False) == [33, 34, 35, 36, 37]
    for family in p["families"]:
        assert family in shipped_specs() and f"{family}_sweep" in shipped_specs()
    assert choose_seeds("judge", p, quick=False) == p["judge_seeds"]
    assert choose_seeds(None, p, quick=True) == p["quick"]["seeds"]
    assert choose_seeds("3,4", p, quick=False) == [3, 4]
    with pytest.raises(UserError, match="'dev', 'judge'"):
        choose_seeds("some", p, quick=False)
    with pytest.raises(UserError, match="zoo family 'zoo_pach' has no shipped spec.*zoo_patch"):
        choose_families("zoo_pach", p, quick=False)


def test_variants_are_parsed_or_refused_by_name():
    assert parse_variant("both:clustering.input=both,groups.merge_easy=true") == (
        "both",
        ["clustering.input=both", "groups.merge_easy=true"],
    )
    for bad in ("both", "both:", ":a=1", "both:clustering.input"):
        with pytest.raises(UserError, match="NAME:key=value"):
            parse_variant(bad)


def test_summary_ranks_label_free_rows_and_measures_the_gap_to_the_oracle():
    rows = []
    for family, wgas in (("a", {"A": 0.5, "B": 0.7, ORACLE: 0.9}), ("b", {"A": 0.6, "B": 0.2, ORACLE: 0.8})):
        for seed in (0, 1):
            for name, w in wgas.items():
                rows.append(
                    {
                        "row": name,
                        "family": family,
                        "seed": seed,
                        "test_wga": w + 0.01 * seed,
                        "test_mean_acc": 0.9,
                        "worst_recovery": 0.4 if name == "B" else 1.0,
                    }
                )
    _, summary = summarize(rows, ["a", "b"])
    s = {r["row"]: r for r in summary}
    assert s["A"]["mean_rank"] == 1.5 and s["B"]["mean_rank"] == 1.5  # each first on one family
    assert math.isclose(s["A"]["mean_wga"], 0.555) and math.isclose(s["A"]["mean_gap_to_oracle"], 0.3)
    assert s["B"]["worst_recovery"] == 0.4 and math.isnan(s[ORACLE]["mean_rank"])


def test_one_tiny_family_end_to_end(ray_local, tmp_path):
    """zoo_patch at 300 images, one seed: the shipped row, a variant and the label-free pick between them,
    on one ERM and one set of heatmaps (the variant reuses the stage cache); the report, the JSON and the plot."""
    out = tmp_path / "zoo"
    res = run_zoo(
        ["zoo_patch"],
        [0],
        out,
        tmp_path / "cache",
        sets=TINY,
        sweep=False,
        baselines=False,
        variants=[("both", ["clustering.input=both"])],
    )
    names = [r["row"] for r in res["by_family"]["zoo_patch"]]
    assert names[:2] == ["ERM", ORACLE] and SHIPPED_ROW in names and "ExMap (both)" in names
    assert PICK_VARIANTS in names
    per_seed = json.loads((out / "zoo_per_seed.json").read_text())
    pick = next(r for r in per_seed if r["row"] == PICK_VARIANTS)
    chosen = next(r for r in per_seed if r["row"] == ("ExMap (both)" if pick["pick"] == "both" else SHIPPED_ROW))
    assert pick["test_wga"] == chosen["test_wga"] and pick["n_trials"] == 2  # the pick is one of the two rows
    report = (out / "zoo.md").read_text()
    assert "## Summary over families" in report and "## zoo_patch" in report and "picked `" in report
    assert (out / "zoo_wga.png").stat().st_size > 1000
    records = [r for r in json.loads((out / "zoo.json").read_text())["per_seed"] if r["row"] == SHIPPED_ROW]
    assert len(records) == 1 and 0.0 <= records[0]["test_wga"] <= 1.0
    # the shipped zoo spec picks among its groups.pick_among entries; a variant row is its keys as given
    entries = [label for label, _ in pick_variants(load_spec(SHIPPED / "zoo_patch.yaml", TINY))]
    assert len(entries) > 1 and records[0]["pick"] in entries
    variant = next(r for r in per_seed if r["row"] == "ExMap (both)")
    assert "pick" not in variant and variant["variant"] == "clustering.input=both"
