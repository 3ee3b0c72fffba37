"""Does `groups.split_ica` help, alone or as more `groups.pick_among` entries? Offline, on what
`pick_scores.py collect --keep-features` saved.

    python benchmarks/studies/split_study.py fit runs/pick-scores/full-dev runs/pick-scores/full-dev-split
    python benchmarks/studies/split_study.py score runs/pick-scores/full-dev-split

`fit`: for each collected family-seed and entry, the entry's val pseudo groups are split by the
project's own `split_by_components` (the key's code, with the clusters stage's seed and the spec's
clustering.min_group_size), and the family's DFR is fitted on them as a row is (`exmap_ray.retrain`, the
spec's keys and seed). Per family-seed one pickle: every entry and every "<entry>+ica", with its groups,
held-out halves and test WGA. `score`: per family (mean over the collected seeds), each entry alone and
what `groups.pick_among`'s rule (`search.metric: sweep_pooled_worst_group_acc`, one-SE, fewest groups)
picks from several sets of entries. Test WGA is read here to compare; true groups never enter a pick.
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
from pathlib import Path

import numpy as np

BASES = ["shipped", "both", "both-merge", "both-silhouette"]
SETS = {  # rows of `score`: label -> the pick_among entries, in order (the first is the spec as it is)
    "the shipped pick (4 entries)": BASES,
    "4 + both-silhouette+ica": [*BASES, "both-silhouette+ica"],
    "4 + both+ica": [*BASES, "both+ica"],
    "4 + both-merge+ica, both-silhouette+ica": [*BASES, "both-merge+ica", "both-silhouette+ica"],
    "every entry with split_ica instead": [b + "+ica" for b in BASES],
    "4 + the 4 with split_ica (8 entries)": [*BASES, *(b + "+ica" for b in BASES)],
}


def fit(src: Path, out: Path) -> None:
    from exmap_ray.groups.formation import split_by_components

    def split(groups, z, spec, seed):
        from exmap_ray.spec import stage_seed

        out, info = split_by_components(
            groups, z["val_features"], stage_seed(seed, "clusters"), spec.clustering.min_group_size
        )
        return out, {"attributes": info["attributes"]}

    fit_entries(src, out, "+ica", split)


def fit_entries(src: Path, out: Path, suffix: str, regroup, describe=None) -> None:
    """For each collected family-seed (`pick_scores.py collect --keep-features`), each entry in BASES as
    collected and "<entry><suffix>": its groups after `regroup(groups, npz, spec, seed) -> (groups, record)`,
    with the family's DFR fitted on them as a row is (`exmap_ray.retrain`, the spec's keys and seed).
    `describe(npz, groups) -> dict` adds to every entry's record (for the report only). One pickle per
    family-seed in `out`, written atomically; a family-seed already there is skipped."""
    from exmap_ray.hashing import RETRAIN_SEED
    from exmap_ray.retrain.base import RETRAINERS
    from exmap_ray.selection import worst_group_acc
    from exmap_ray.spec import SHIPPED, load_spec, stage_seed

    out.mkdir(parents=True, exist_ok=True)
    for p in sorted(src.glob("*.npz")):
        dest = out / (p.stem + ".pkl")
        if dest.exists():
            continue
        z = np.load(p, allow_pickle=True)
        meta = json.loads(str(z["meta"]))
        family, seed = meta["family"], meta["seed"]
        spec = load_spec(SHIPPED / f"{family}.yaml", [f"seed={seed}"])
        r = RETRAINERS.get("dfr")
        cfg, rseed = r.config(spec), stage_seed(seed, RETRAIN_SEED)
        y, ty, tg = z["y"], z["test_y"], z["test_group"]
        Xv, Xt = z["val_features"], z["test_features"]
        by_test = {m["entry"]: m["test_wga"] for m in meta["entries"]}
        entries = {}
        for b in BASES:
            groups = z[f"{b}/pseudo"]
            entries[b] = dict(
                groups=groups, heldout_idx=z[f"{b}/heldout_idx"], heldout_pred=z[f"{b}/heldout_pred"], test=by_test[b]
            )
            new, record = regroup(groups, z, spec, seed)
            head = r.fit(Xv, y, new, cfg, rseed)
            entries[b + suffix] = dict(
                groups=new,
                heldout_idx=head.heldout_idx,
                heldout_pred=head.heldout_pred,
                test=worst_group_acc(head.predict(Xt), ty, tg),
                **record,
            )
            if describe is not None:
                for name in (b, b + suffix):
                    entries[name].update(describe(z, entries[name]["groups"]))
        tmp = dest.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            pickle.dump(dict(family=family, seed=seed, oracle=meta["oracle"], y=y, entries=entries), f)
        tmp.rename(dest)
        print(family, seed, {k: round(v["test"], 3) for k, v in entries.items()}, flush=True)


def score(src: Path, sets: dict | None = None) -> None:
    """Per family, each entry alone and the pick over each of `sets` (label -> entries; default SETS), from
    the pickles `fit` wrote (refine_study.py's have the same layout)."""
    from pick_scores import shipped_rule  # this folder is on sys.path when the script runs
    from union_dfr import print_family_table

    rows: dict[str, dict[str, list[float]]] = {}
    files = sorted(src.glob("*.pkl"))
    for p in files:
        with open(p, "rb") as f:
            d = pickle.load(f)
        fam, E, y = d["family"].removeprefix("zoo_"), d["entries"], d["y"]

        def add(row, v):
            rows.setdefault(row, {}).setdefault(fam, []).append(v)

        add("oracle DFR", d["oracle"])
        for k, v in E.items():
            add(f"always {k}", v["test"])
        for row, names in (sets or SETS).items():
            models = [dict(heldout_idx=E[n]["heldout_idx"], heldout_pred=E[n]["heldout_pred"]) for n in names]
            picked = shipped_rule(models, [E[n]["groups"] for n in names], y, metric="sweep_pooled_worst_group_acc")
            add(f"pick: {row}", E[names[int(np.argmax(picked))]]["test"])
        add("best entry (test; not label-free)", max(v["test"] for v in E.values()))
    print(f"{len(files)} family-seeds from {src}; test WGA, mean over seeds")
    print_family_table(rows)


def fit_score_cli(doc: str, fit_fn, score_fn, argv=None) -> int:
    """`fit SRC OUT` and `score SRC`, the two sub-commands of this study and refine_study.py."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fit")
    f.add_argument("src", type=Path)
    f.add_argument("out", type=Path)
    s = sub.add_parser("score")
    s.add_argument("src", type=Path)
    a = ap.parse_args(argv)
    fit_fn(a.src, a.out) if a.cmd == "fit" else score_fn(a.src)
    return 0


def main(argv=None) -> int:
    return fit_score_cli(__doc__, fit, score, argv)


if __name__ == "__main__":
    sys.exit(main())
