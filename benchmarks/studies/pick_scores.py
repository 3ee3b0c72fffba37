"""Which label-free score chooses best among `groups.pick_among` entries? Collect once, score offline.

    # 1. fit every entry on a family's shared upstream (the stage cache) and keep what a score may read
    python benchmarks/studies/pick_scores.py collect --families zoo_patch,zoo_frame --seeds 0,1 \
        --cache runs/zoo-cache --out runs/pick-scores/dev [--set dataset.n_val=2000 ...]
    # 2. every rule on every collected family-seed: the test WGA of the entry it picks, per family
    python benchmarks/studies/pick_scores.py score runs/pick-scores/dev

`collect` writes one npz per family and seed: val y, val true groups (for the report only), and per entry
its val pseudo groups, its DFR fit's held-out halves (indices and predictions) and its test WGA. `score`
trains nothing: it applies each rule in RULES (selection-score variants; true groups never enter a rule)
and prints, per family, the mean test WGA of the entries each rule picks, with the oracle choice (the best
entry by test WGA) beside it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

import numpy as np

ENTRIES = {  # the groups.pick_among entries that can be studied: label -> --set words
    "shipped": [],
    "both": ["clustering.input=both"],
    "both-merge": ["clustering.input=both", "groups.merge_easy=true"],
    "features": ["clustering.input=features"],
    "both-local": ["clustering.input=both", "clustering.scope=local"],
    "features-local": ["clustering.input=features", "clustering.scope=local"],
    "both-merge-local": ["clustering.input=both", "groups.merge_easy=true", "clustering.scope=local"],
    # GEORGE's kind: k-means per class, k by the best silhouette
    "features-silhouette-local": [
        "clustering.input=features",
        "clustering.method=kmeans_silhouette",
        "clustering.scope=local",
    ],
    "both-silhouette-local": ["clustering.input=both", "clustering.method=kmeans_silhouette", "clustering.scope=local"],
    "both-silhouette": ["clustering.input=both", "clustering.method=kmeans_silhouette"],
    "both-silhouette-merge": ["clustering.input=both", "clustering.method=kmeans_silhouette", "groups.merge_easy=true"],
    # groups.split_ica: each grouping above, then split by two-moded independent components of the features
    "shipped-ica": ["groups.split_ica=true"],
    "both-ica": ["clustering.input=both", "groups.split_ica=true"],
    "both-merge-ica": ["clustering.input=both", "groups.merge_easy=true", "groups.split_ica=true"],
    "both-silhouette-ica": ["clustering.input=both", "clustering.method=kmeans_silhouette", "groups.split_ica=true"],
    # products of two groupings: the heatmaps' clusters split by the features' (or by the channel-summed maps')
    "cross-features": ["clustering.cross_features=all"],
    "cross-features-hard": ["clustering.cross_features=hard"],
    "both-cross-spatial-hard": ["clustering.input=both", "clustering.cross_spatial=hard"],
}
COLLECTED = ["shipped", "both", "both-merge", "features"]


def collect(
    families: list[str],
    seeds: list[int],
    sets: list[str],
    cache_dir: str,
    out: Path,
    entries=COLLECTED,
    keep_features: bool = False,
) -> None:
    from exmap_ray.cache import StageCache
    from exmap_ray.pipeline import evaluate_row, preflight
    from exmap_ray.resources import resolve_resources
    from exmap_ray.spec import SHIPPED, load_spec
    from exmap_ray.stages import Timer, compute_upstream

    out.mkdir(parents=True, exist_ok=True)
    cache, timer = StageCache(cache_dir), Timer()
    for family in families:
        for seed in seeds:
            path = out / f"{family}_seed{seed}.npz"
            if path.exists():
                continue
            spec = resolve_resources(
                load_spec(SHIPPED / f"{family}.yaml", [*sets, "groups.pick_among=[]", f"seed={seed}"])
            )
            data = preflight(spec, check_model=False)
            up = compute_upstream(spec, data, cache, timer)
            arrays = {"y": data.val.y, "group": data.val.group, "test_y": data.test.y, "test_group": data.test.group}
            if keep_features:  # for retraining studies offline (e.g. several groupings' fits together)
                arrays["val_features"] = np.asarray(up.val_features, np.float32)
                arrays["test_features"] = np.asarray(up.test_features, np.float32)
            meta = []
            for label in entries:
                words = ["groups.pick_among=[]", *ENTRIES[label]]  # each entry as given (the spec may pick)
                v = dataclasses.replace(
                    load_spec(SHIPPED / f"{family}.yaml", [*sets, *words, f"seed={seed}"]), resources=spec.resources
                )
                vup = compute_upstream(v, data, cache, timer, have=up)
                r = evaluate_row(
                    v, data, vup, v.groups.source, v.retrain.method, groups=vup.pseudo, group_info=vup.info["clusters"]
                )
                arrays[f"{label}/pseudo"] = vup.pseudo
                arrays[f"{label}/heldout_idx"] = r.model.heldout_idx
                arrays[f"{label}/heldout_pred"] = r.model.heldout_pred
                arrays[f"{label}/test_decision"] = r.model.head.decision(vup.test_features)
                meta.append(
                    {"entry": label, "test_wga": r.test["worst_group_acc"], "test_mean": r.test.get("mean_acc")}
                )
            oracle = evaluate_row(spec, data, up, "true", "dfr", groups=data.val.group)
            arrays["meta"] = np.array(
                json.dumps({"family": family, "seed": seed, "entries": meta, "oracle": oracle.test["worst_group_acc"]})
            )
            tmp = path.with_suffix(".tmp.npz")
            np.savez(tmp, **arrays)
            tmp.rename(path)
            print(family, seed, [(m["entry"], round(m["test_wga"], 3)) for m in meta], flush=True)


# ── scores: (models, groupings, y) -> one number per model; larger is better ──────────────────────────
def _group_acc(idx, pred, y, groups, min_members, shrink):
    """Per group of `groups` on held-out half `idx`: accuracy (shrunk toward the half's accuracy by
    `shrink` pseudo-counts), for groups with at least min_members there."""
    g = groups[idx]
    right = (pred == y[idx]).astype(float)
    labels, inv = np.unique(g, return_inverse=True)
    count = np.bincount(inv)
    hits = np.bincount(inv, weights=right)
    p = right.mean()
    acc = (hits + shrink * p) / (count + shrink)
    keep = count >= min_members
    return acc[keep], count[keep]


def worst(model, groupings, y, min_members=3, shrink=0.0, frac=0.0, agg="min"):
    """Mean over halves of the worst group accuracy, per grouping; then `agg` over groupings."""
    per = []
    for groups in groupings:
        vals = []
        for idx, pred in zip(model["heldout_idx"], model["heldout_pred"]):
            m = max(min_members, int(math.ceil(frac * len(idx))))
            acc, _ = _group_acc(idx, pred, y, groups, m, shrink)
            if len(acc):
                vals.append(acc.min())
        if vals:
            per.append(float(np.mean(vals)))
    if not per:
        return float("nan")
    return float({"min": np.min, "mean": np.mean}[agg](per))


def pooled(model, groupings, y, min_val=3):
    """Each group's accuracy pooled over the held-out halves (every prediction of its members), over the
    groups of every grouping with at least `min_val` val members: (the minimum, that group's val size)."""
    idx, pred = np.concatenate(model["heldout_idx"]), np.concatenate(model["heldout_pred"])
    right = (pred == y[idx]).astype(float)
    best = (np.inf, 0)
    for groups in groupings:
        labels, inv = np.unique(groups, return_inverse=True)
        size = np.bincount(inv)
        g = inv[idx]
        count = np.bincount(g, minlength=len(labels))
        hits = np.bincount(g, weights=right, minlength=len(labels))
        ok = (size >= min_val) & (count > 0)
        if ok.any():
            acc = np.where(ok, hits / np.maximum(count, 1), np.inf)
            a = int(np.argmin(acc))
            if acc[a] < best[0]:
                best = (float(acc[a]), int(size[a]))
    return best


def pooled_rule(models, groupings, y, min_val=3, select="best", k=1.0):
    res = [pooled(m, groupings, y, min_val) for m in models]
    sc = [r[0] for r in res]
    b = int(np.argmax(sc))
    se = lambda i: binomial_se(res[i][0], res[i][1])  # noqa: E731
    if select == "best":
        pick = b
    elif select == "one_se":  # fewest groups within the best's SE
        band = [i for i in range(len(sc)) if sc[i] >= sc[b] - k * se(b)]
        pick = min(band, key=lambda i: (len(np.unique(groupings[i])), -sc[i], i))
    else:  # default first
        pick = 0 if sc[0] >= sc[b] - k * math.hypot(se(b), se(0)) else b
    return [float(i == pick) for i in range(len(models))]


def rule_scores(models, groupings, y, **kw):
    return [worst(m, groupings, y, **kw) for m in models]


def rank_sum(models, groupings, y, **kw):
    """Borda: on each grouping rank the models by their worst group there; minus the summed ranks."""
    table = np.array([[worst(m, [g], y, **kw) for g in groupings] for m in models])  # (models, groupings)
    ranks = np.argsort(np.argsort(-table, axis=0), axis=0)
    return list(-ranks.sum(1).astype(float))


def cross(models, groupings, y, **kw):
    """Each model scored on the other entries' groupings only (not the one it was fitted to)."""
    return [
        worst(m, [g for j, g in enumerate(groupings) if j != i] or groupings, y, **kw) for i, m in enumerate(models)
    ]


def binomial_se(score, n):
    return math.sqrt(max(score * (1 - score), 0.0) / max(n, 1))


def shipped_rule(models, groupings, y, select="one_se", min_members=3, metric=None):
    """selection.pick_among as `groups.pick_among` runs it (sweep metric, one-SE binomial, fewest groups):
    returned as scores, 1 for the chosen entry and 0 elsewhere."""
    from types import SimpleNamespace

    from exmap_ray.selection import SWEEP_METRIC, pick_among

    cands = [
        (
            SimpleNamespace(
                model=SimpleNamespace(
                    heldout_idx=m["heldout_idx"], heldout_pred=m["heldout_pred"], heldout={"pseudo": 0, "class": 0}
                ),
                group_info={"n_groups": len(np.unique(g))},
            ),
            g,
        )
        for m, g in zip(models, groupings)
    ]
    pick, scored = pick_among(
        cands, y, metric or SWEEP_METRIC, select.split(":")[0] if ":" in select else select, "binomial", min_members
    )
    if select.startswith("default"):  # the first entry unless the best beats it by more than k SE
        k = float(select.split(":")[1])
        best = max(scored, key=lambda r: r["selection_metric"])
        first = scored[0]
        se = best["selection_se"]
        if select.startswith("default2"):  # both entries' errors
            se = math.hypot(best["selection_se"], first["selection_se"])
        pick = 0 if first["selection_metric"] >= best["selection_metric"] - k * se else pick
    return [float(i == pick) for i in range(len(models))]


RULES = {
    "pooled metric (product), one_se": lambda M, G, y: shipped_rule(M, G, y, metric="sweep_pooled_worst_group_acc"),
    "shipped rule (one_se, binomial)": lambda M, G, y: shipped_rule(M, G, y),
    **{
        f"shipped rule, min members {m}": (lambda m: lambda M, G, y: shipped_rule(M, G, y, min_members=m))(m)
        for m in (4, 5, 6, 8)
    },
    **{
        f"default unless beaten by 1 SE (both SEs), min {m}": (
            lambda m: lambda M, G, y: shipped_rule(M, G, y, "default2:1", min_members=m)
        )(m)
        for m in (4, 5, 6)
    },
    **{  # the shipped metric and one-SE rule, groups under m val members left out of the score
        f"shipped pooled metric, min members {m}": (
            lambda m: lambda M, G, y: shipped_rule(M, G, y, metric="sweep_pooled_worst_group_acc", min_members=m)
        )(m)
        for m in (3, 5, 6, 8, 10, 12, 15, 20)
    },
    **{
        f"pooled min{m} {sel}": (lambda m, sel: lambda M, G, y: pooled_rule(M, G, y, m, sel))(m, sel)
        for m in (3, 5, 8)
        for sel in ("best", "one_se", "default")
    },
    "default unless beaten by 1 SE": lambda M, G, y: shipped_rule(M, G, y, "default:1"),
    "default unless beaten by 2 SE": lambda M, G, y: shipped_rule(M, G, y, "default:2"),
    "default unless beaten by 3 SE": lambda M, G, y: shipped_rule(M, G, y, "default:3"),
    "default unless beaten by 1 SE (both SEs)": lambda M, G, y: shipped_rule(M, G, y, "default2:1"),
    "default unless beaten by 2 SE (both SEs)": lambda M, G, y: shipped_rule(M, G, y, "default2:2"),
    "min3 (shipped rule's score, best)": lambda M, G, y: rule_scores(M, G, y),
    "min10": lambda M, G, y: rule_scores(M, G, y, min_members=10),
    "min20": lambda M, G, y: rule_scores(M, G, y, min_members=20),
    "frac2%": lambda M, G, y: rule_scores(M, G, y, frac=0.02),
    "shrink10": lambda M, G, y: rule_scores(M, G, y, shrink=10),
    "shrink20": lambda M, G, y: rule_scores(M, G, y, shrink=20),
    "shrink50": lambda M, G, y: rule_scores(M, G, y, shrink=50),
    "mean-over-groupings": lambda M, G, y: rule_scores(M, G, y, agg="mean"),
    "mean-over-groupings shrink20": lambda M, G, y: rule_scores(M, G, y, agg="mean", shrink=20),
    "borda": lambda M, G, y: rank_sum(M, G, y),
    "borda shrink20": lambda M, G, y: rank_sum(M, G, y, shrink=20),
    "cross": lambda M, G, y: cross(M, G, y),
    "cross shrink20": lambda M, G, y: cross(M, G, y, shrink=20),
}


def load(path: Path):
    z = np.load(path)
    meta = json.loads(str(z["meta"]))
    models, groupings = [], []
    for m in meta["entries"]:
        e = m["entry"]
        models.append({"heldout_idx": z[f"{e}/heldout_idx"], "heldout_pred": z[f"{e}/heldout_pred"]})
        groupings.append(z[f"{e}/pseudo"])
    return meta, models, groupings, z["y"]


def score(dirs: list[Path], entries: list[str]) -> None:
    rows = []  # (family, seed, rule, picked entry, its test wga, best wga, oracle)
    for d in dirs:
        for path in sorted(d.glob("*.npz")):
            meta, models, groupings, y = load(path)
            keep = [i for i, m in enumerate(meta["entries"]) if m["entry"] in entries]
            M, G = [models[i] for i in keep], [groupings[i] for i in keep]
            wga = [meta["entries"][i]["test_wga"] for i in keep]
            for name, rule in RULES.items():
                s = np.nan_to_num(np.array(rule(M, G, y), float), nan=-np.inf)
                pick = int(np.argmax(s))  # first on ties: the shipped entry is listed first
                rows.append((meta["family"], meta["seed"], name, entries[pick], wga[pick], max(wga), meta["oracle"]))
            for i, e in enumerate(entries):
                rows.append((meta["family"], meta["seed"], f"always {e}", e, wga[i], max(wga), meta["oracle"]))
    fams = sorted({r[0] for r in rows})
    names = list(dict.fromkeys(r[2] for r in rows))
    print(
        f"entries: {', '.join(entries)}; {len({(r[0], r[1]) for r in rows})} family-seeds "
        f"from {', '.join(map(str, dirs))}"
    )
    print("| rule | " + " | ".join(f.replace("zoo_", "") for f in fams) + " | mean | worst vs best entry |")
    print("|---|" + "---|" * (len(fams) + 2))
    best = {f: np.mean([r[5] for r in rows if r[0] == f and r[2] == names[0]]) for f in fams}
    for n in [*names, "best entry (test; not label-free)"]:
        if n.startswith("best entry"):
            per = [best[f] for f in fams]
        else:
            per = [np.mean([r[4] for r in rows if r[0] == f and r[2] == n]) for f in fams]
        gap = min(p - best[f] for p, f in zip(per, fams))
        print(f"| {n} | " + " | ".join(f"{p:.3f}" for p in per) + f" | **{np.mean(per):.3f}** | {gap:+.3f} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("collect")
    c.add_argument("--families", required=True)
    c.add_argument("--seeds", required=True)
    c.add_argument("--cache", required=True)
    c.add_argument("--out", required=True, type=Path)
    c.add_argument("--set", action="append", default=[])
    c.add_argument("--entries", default=",".join(COLLECTED), help=f"of {', '.join(ENTRIES)}")
    c.add_argument("--keep-features", action="store_true", help="also save val and test features, test groups")
    s = sub.add_parser("score")
    s.add_argument("dirs", nargs="+", type=Path)
    s.add_argument("--entries", default="shipped,both,both-merge")
    a = ap.parse_args(argv)
    if a.cmd == "collect":
        from exmap_ray.cli import ray_session

        with ray_session(None):
            collect(
                a.families.split(","),
                [int(x) for x in a.seeds.split(",")],
                a.set,
                a.cache,
                a.out,
                a.entries.split(","),
                a.keep_features,
            )
    else:
        score(a.dirs, a.entries.split(","))
    return 0


if __name__ == "__main__":
    sys.exit(main())
