"""The scalable clustering route and float16 storage, checked on real heatmaps of a trained model.

    python benchmarks/real_heatmaps.py                       # cmnist and cmnist_multi, 6,500 val images each
    python benchmarks/real_heatmaps.py --specs cmnist --n-val 3000
    python benchmarks/real_heatmaps.py --anchor-sweep        # anchor density x links per row, same stores

For each spec, `exmap-ray run SPEC` trains ERM and extracts LRP heatmaps on a val split enlarged to
`--n-val` images (the 10k shipped MNIST digits: train + val + test <= 10,000), once, under --out.
Its heatmap store is then clustered (spectral, k = auto, each scope) four ways:

- exact:          the exact path (kNN graph by exact search), what runs below SCALE_MIN_N;
- anchor:         the anchor-graph route forced, what runs from SCALE_MIN_N rows on;
- float16:        the exact path on the store's heatmaps cast to float16 and back (a float16 store);
- float16_anchor: the anchor route on those float16 heatmaps.

Printed per case: eigengap k, ARI against the exact case's pseudo groups, ARI against the true val
groups, the worst true group's recovery (the smallest share of a true group that lands in pseudo
groups where it is the majority), and seconds. With --anchor-sweep, the anchor route is also run at
one anchor per {20, 10, 5} rows (ANCHOR_MIN_SHARE) times {5, 10} anchors per row (ANCHOR_NN), against
the exact case. Figures are printed, never asserted; the pinned
agreement check on planted data is tests/test_cluster_scale.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def run_upstream(spec: str, out: Path, n_val: int) -> Path:
    """`exmap-ray run` once; returns its heatmap stage folder."""
    if not (out / "results.json").exists():
        n_test = 1000
        n_train = 10_000 - n_val - n_test
        cmd = [
            sys.executable,
            "-m",
            "exmap_ray",
            "run",
            spec,
            "--out",
            str(out),
            "--quiet",
            "--set",
            f"dataset.n_val={n_val}",
            "--set",
            f"dataset.n_train={n_train}",
            "--set",
            f"dataset.n_test={n_test}",
        ]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    [hm] = sorted((out / "cache").glob("heatmaps-*"))
    return hm


def worst_recovery(true: np.ndarray, pseudo: np.ndarray) -> float:
    """Smallest share of a true group that lies in pseudo groups where that true group is the majority."""
    shares = []
    for g in np.unique(true):
        members = true == g
        owned = 0
        for p in np.unique(pseudo[members]):
            in_p = pseudo == p
            if np.bincount(true[in_p]).argmax() == g:
                owned += int((in_p & members).sum())
        shares.append(owned / members.sum())
    return float(min(shares))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--specs", default="cmnist,cmnist_multi")
    ap.add_argument("--n-val", type=int, default=6500)
    ap.add_argument("--scopes", default="global,local")
    ap.add_argument("--out", default=str(ROOT / "runs" / "real_heatmaps"))
    ap.add_argument("--anchor-sweep", action="store_true", help="also vary the anchor density and links per row")
    a = ap.parse_args()

    from sklearn.metrics import adjusted_rand_score as ari

    from exmap_ray import clustering
    from exmap_ray.groups import pseudo_groups
    from exmap_ray.clustering import scale as clustering_scale
    from exmap_ray.clustering.scale import float16_roundtrip
    from exmap_ray.data import build_dataset
    from exmap_ray.heatmaps.extract import HeatmapShards
    from exmap_ray.spec import from_dict

    rows = []
    for name in a.specs.split(","):
        out = Path(a.out) / f"{name}_val{a.n_val}"
        hm_dir = run_upstream(name, out, a.n_val)
        spec = from_dict(json.loads((out / "spec.resolved.json").read_text()))
        data = build_dataset(spec.dataset, spec.seed)
        y, true = np.asarray(data.val.y), np.asarray(data.val.group)
        H = HeatmapShards(hm_dir).load()
        H16 = float16_roundtrip(H)
        print(f"{name}: {H.shape[0]} real heatmaps of {H.shape[1:]} from {hm_dir}", flush=True)
        default_min = clustering.scale.SCALE_MIN_N
        for scope in a.scopes.split(","):
            cs = dataclasses.replace(spec.clustering, method="spectral", k="auto", scope=scope)
            ref = None
            cases = [
                ("exact", H, 1 << 62, None),
                ("anchor", H, 2, None),
                ("float16", H16, 1 << 62, None),
                ("float16_anchor", H16, 2, None),
            ]
            if a.anchor_sweep:
                cases += [(f"anchor share {share} r {r}", H, 2, (share, r)) for share in (20, 10, 5) for r in (5, 10)]
            for case, X, min_n, density in cases:
                clustering.scale.SCALE_MIN_N = min_n
                defaults = (clustering_scale.ANCHOR_MIN_SHARE, clustering_scale.anchor_spectrum.__defaults__)
                if density:  # anchor_spectrum binds r as a default argument
                    clustering_scale.ANCHOR_MIN_SHARE = density[0]
                    clustering_scale.anchor_spectrum.__defaults__ = (*defaults[1][:-1], density[1])
                t0 = time.perf_counter()
                labels, info = pseudo_groups(X, y, cs, seed=spec.seed)
                secs = time.perf_counter() - t0
                clustering.scale.SCALE_MIN_N = default_min
                clustering_scale.ANCHOR_MIN_SHARE, clustering_scale.anchor_spectrum.__defaults__ = defaults
                ref = labels if ref is None else ref
                ks = {s: v["k"] for s, v in info["scopes"].items()}
                row = {
                    "spec": name,
                    "n": len(y),
                    "scope": scope,
                    "case": case,
                    "k": ks["global"] if scope == "global" else "/".join(str(ks[s]) for s in sorted(ks)),
                    "groups": int(labels.max()) + 1,
                    "ari_vs_exact": round(float(ari(ref, labels)), 4),
                    "ari_true": round(float(ari(true, labels)), 4),
                    "worst_recovery": round(worst_recovery(true, labels), 4),
                    "seconds": round(secs, 1),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    cols = list(rows[0])
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")


if __name__ == "__main__":
    main()
