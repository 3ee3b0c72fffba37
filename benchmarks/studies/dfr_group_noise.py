"""How much test WGA does DFR lose when the val groups it is given are nearly, but not quite, the true
ones? Offline, on what `pick_scores.py collect --keep-features` saved (2-class families with 4 true groups).

    python benchmarks/studies/dfr_group_noise.py runs/pick-scores/full-dev

Per family-seed, DFR (the family's spec keys, as a row fits it) on the true val groups, then on the true
groups with a share of each minority group moved into its class's majority group (missed minority:
recall lost), and with majority points moved into each minority group (contaminants: precision lost, the
same number of points as a share of the minority). The points moved are drawn at random (seed 0). Then
the errors a clustering makes: the `both-silhouette` entry's groups, each pseudo group named by the true
group most of it holds ("the entry's errors"), against the true groups with the same confusion matrix
but its moved points drawn at random ("the same errors at random"). Each setting is fitted with DFR seeds
s, s+1, s+2 (s the row's seed) and the test WGA averaged. Prints the mean over family-seeds per family and
over all, and each setting's change against the true groups.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

SHARES = (0.1, 0.2, 0.4)  # of each minority group's size


def perturb(groups: np.ndarray, y: np.ndarray, share: float, kind: str, rng) -> np.ndarray:
    """The true groups with `share` of each minority group's size moved: 'missed' minority members go to
    their class's largest group; 'contaminants' from the class's largest group join the minority group."""
    out = groups.copy()
    for c in np.unique(y):
        ids, counts = np.unique(groups[y == c], return_counts=True)
        major = ids[np.argmax(counts)]
        for g, n in zip(ids, counts):
            if g == major:
                continue
            m = int(round(share * n))
            src = np.flatnonzero(groups == (g if kind == "missed" else major))
            out[rng.choice(src, m, replace=False)] = major if kind == "missed" else g
    return out


def named(groups: np.ndarray, pseudo: np.ndarray) -> np.ndarray:
    """Each pseudo group renamed to the true group most of its members are in."""
    out = np.empty_like(groups)
    for q in np.unique(pseudo):
        out[pseudo == q] = np.bincount(groups[pseudo == q]).argmax()
    return out


def same_errors_at_random(groups: np.ndarray, given: np.ndarray, rng) -> np.ndarray:
    """The true groups with given's confusion (how many of true group t it calls a) but random members."""
    out = groups.copy()
    for t in np.unique(groups):
        members = rng.permutation(np.flatnonzero(groups == t))
        start = 0
        for a in np.unique(given[groups == t]):
            if a == t:
                continue
            n = int(((groups == t) & (given == a)).sum())
            out[members[start : start + n]] = a
            start += n
    return out


def main(src: Path) -> None:
    from exmap_ray.hashing import RETRAIN_SEED
    from exmap_ray.retrain.base import RETRAINERS
    from exmap_ray.selection import worst_group_acc
    from exmap_ray.spec import SHIPPED, load_spec, stage_seed

    settings = ["true"] + [f"{k} {int(s * 100)}%" for k in ("missed", "contaminants") for s in SHARES]
    settings += ["the entry's errors", "the same errors at random"]
    table: dict[str, dict[str, list[float]]] = {}
    for p in sorted(src.glob("*.npz")):
        z = np.load(p, allow_pickle=True)
        meta = json.loads(str(z["meta"]))
        family, seed = meta["family"], meta["seed"]
        g, y = z["group"], z["y"]
        if len(np.unique(g)) != 4:
            continue  # the pairs' 8 groups: no single minority per class
        spec = load_spec(SHIPPED / f"{family}.yaml", [f"seed={seed}"])
        r = RETRAINERS.get("dfr")
        cfg, base = r.config(spec), stage_seed(seed, RETRAIN_SEED)
        Xv, Xt, ty, tg = z["val_features"], z["test_features"], z["test_y"], z["test_group"]
        rng = np.random.default_rng(0)
        entry = named(g, z["both-silhouette/pseudo"])
        for name in settings:
            if name == "true":
                groups = g
            elif name == "the entry's errors":
                groups = entry
            elif name == "the same errors at random":
                groups = same_errors_at_random(g, entry, rng)
            else:
                groups = perturb(g, y, int(name.split()[1][:-1]) / 100, name.split()[0], rng)
            wga = [worst_group_acc(r.fit(Xv, y, groups, cfg, base + i).predict(Xt), ty, tg) for i in range(3)]
            table.setdefault(name, {}).setdefault(family.removeprefix("zoo_"), []).append(float(np.mean(wga)))
        print(family, seed, {k: round(v[family.removeprefix("zoo_")][-1], 3) for k, v in table.items()}, flush=True)
    fams = sorted(next(iter(table.values())))
    print("\n| groups given to DFR | " + " | ".join(fams) + " | mean | change |")
    print("|---|" + "---|" * (len(fams) + 2))
    ref = np.mean([np.mean(table["true"][f]) for f in fams])
    for name in settings:
        vals = [np.mean(table[name][f]) for f in fams]
        cells = " | ".join(f"{v:.3f}" for v in vals)
        print(f"| {name} | {cells} | {np.mean(vals):.3f} | {np.mean(vals) - ref:+.3f} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
