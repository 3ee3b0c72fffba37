"""Clustering at scale: time, peak memory and agreement with the exact path, N = 10k .. 10M.

    nice -n 10 python benchmarks/cluster_scale.py --sizes 10k,100k,1M            # ~10 min on 2 busy cores
    python benchmarks/cluster_scale.py --sizes 10M --cases spectral              # once: writes a 5.9 GB memmap
    python benchmarks/cluster_scale.py --sizes 100k,300k --cases spectral,exact  # the agreement check
    python benchmarks/cluster_scale.py --sizes 100k --cases knn_ivf,float16      # the alternatives
    python benchmarks/cluster_scale.py ... --table docs/cluster_scale.md         # also write the table there
    python benchmarks/cluster_scale.py --data centres --sizes 1M,3M,10M --cases spectral  # issue 31: k vs N

Data (`--data`): `heatmaps`: `planted_heatmaps` (d = 147 = 3x7x7, two classes, a shortcut channel,
four planted groups; the minority is 1% of the rows below 1M and 0.1% from 1M on); `centres`:
`planted_centres` (issue 31: two N(0, I) centres in 147-d picked by a pattern that equals the class
except on 1% of the rows, noise 0.6; four planted groups, class x pattern). Written once per N to a float32
memmap that every case reads (the store hands clustering memmaps). Each case runs in its own
process; peak memory is the highest anonymous RSS (sampled every 10 ms) above the level before
the stage, so the memmap's page cache is not counted. Wall and CPU seconds are both printed: the
2 cores are shared, so wall time swings with load; CPU seconds do less. `load` is the 1-minute
load average at the case's start and end.

Cases:
- spectral: `pseudo_groups(method=spectral, k=auto, scope=global)`: the exact path below
  SCALE_MIN_N, the anchor graph above.
- exact: the same with the exact path forced (kNN graph by exact search: quadratic).
- anchor: the anchor route forced, also below SCALE_MIN_N (its agreement where exact is cheap).
- kmeans8: `clustering.kmeans` (k-means++ seeds, k = 8, all points, 3 restarts; from SCALE_MIN_N rows
  on the CPU the joint-restart Lloyd, else FAISS).
- knn_ivf: the alternative route: an approximate kNN graph (FAISS IVF) with its recall against
  exact search on 1,000 rows, then the exact path's sparse eigensolver on that graph.
- float16: spectral on the rows cast to float16 and back (`float16_roundtrip`); ARI vs float32.
`--anchor-mean Q` sets the rows averaged into each anchor (default 3) for the anchor route's cases.
Figures are printed (one JSON line per case, then a markdown table), never asserted.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

SIZES = {
    "10k": 10_000,
    "20k": 20_000,
    "60k": 60_000,
    "100k": 100_000,
    "240k": 240_000,
    "300k": 300_000,
    "1M": 1_000_000,
    "3M": 3_000_000,
    "10M": 10_000_000,
}


def minority_for(n: int) -> float:
    return 0.01 if n < 1_000_000 else 0.001


class AnonPeak:
    """Highest RssAnon of this process (sampled) above the level at start, in bytes."""

    def __init__(self):
        self.base = self.peak = self._anon()
        self.stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _anon() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
        return 0

    def _run(self):
        while not self.stop:
            self.peak = max(self.peak, self._anon())
            time.sleep(0.01)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop = True
        self.thread.join()
        self.peak = max(self.peak, self._anon())


def knn_ivf(X: np.ndarray, seed: int) -> dict:
    """The alternative: IVF approximate kNN graph + the exact path's Laplacian eigensolver."""
    import faiss
    import scipy.sparse as sp

    from exmap_ray.clustering import eigengap_k, laplacian_spectrum

    n, k_nn = len(X), int(math.log(len(X)))
    nlist = int(4 * math.sqrt(n))
    t0 = time.time()
    quant = faiss.IndexFlatL2(X.shape[1])
    index = faiss.IndexIVFFlat(quant, X.shape[1], nlist)
    rng = np.random.default_rng(seed)
    index.train(X[np.sort(rng.choice(n, min(n, 64 * nlist), replace=False))])
    index.add(X)
    index.nprobe = 8
    _, nbr = index.search(X, k_nn + 1)
    t_graph = time.time() - t0
    q = np.sort(rng.choice(n, 1000, replace=False))
    flat = faiss.IndexFlatL2(X.shape[1])
    flat.add(X)
    _, exact = flat.search(X[q], k_nn + 1)
    recall = float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(nbr[q].tolist(), exact.tolist())]))
    rows = np.repeat(np.arange(n), k_nn + 1)
    keep = nbr.ravel() >= 0
    C = sp.csr_matrix((np.ones(int(keep.sum())), (rows[keep], nbr.ravel()[keep])), shape=(n, n))
    C.setdiag(0)
    C.eliminate_zeros()
    C.data[:] = 1.0
    t1 = time.time()
    eig, _ = laplacian_spectrum(((C + C.T) * 0.5).tocsr())
    return {
        "graph_s": round(t_graph, 1),
        "eigsh_s": round(time.time() - t1, 1),
        "recall": round(recall, 4),
        "k": eigengap_k(eig, 10),
        "nlist": nlist,
        "nprobe": 8,
    }


def run_case(case: str, path: str, n: int, out: str) -> dict:
    """One case in this process: cluster the memmap at `path`, save labels to `out`, return figures."""
    from exmap_ray import clustering
    from exmap_ray.groups import pseudo_groups
    from exmap_ray.chunked import normalize_rows
    from exmap_ray.clustering.scale import float16_roundtrip
    from exmap_ray.spec import ClusteringSpec

    if os.environ.get("ANCHOR_MEAN"):  # --anchor-mean: the rows averaged into each anchor (the trade-off)
        from exmap_ray.clustering import scale as clustering_scale

        clustering_scale.ANCHOR_MEAN = int(os.environ["ANCHOR_MEAN"])

    H = np.load(path, mmap_mode="r")
    y = np.load(path.replace(".npy", "_y.npy"))
    cs = ClusteringSpec(method="spectral", k="auto", scope="global")
    info: dict = {}
    t0, c0 = time.time(), resource.getrusage(resource.RUSAGE_SELF)
    with AnonPeak() as mem:
        if case in ("spectral", "exact", "anchor"):
            clustering.scale.SCALE_MIN_N = {"spectral": clustering.scale.SCALE_MIN_N, "exact": 1 << 62, "anchor": 2}[
                case
            ]
            labels, gi = pseudo_groups(H, y, cs, seed=0)
            info = {
                "k": gi["scopes"]["global"]["k"],
                "route": gi["scopes"]["global"].get("route", "exact"),
                "eig_3_5": "/".join(f"{v:.3f}" for v in gi["scopes"]["global"]["eigenvalues"][2:5]),
            }
        elif case == "float16":
            labels, gi = pseudo_groups(float16_roundtrip(H), y, cs, seed=0)
            info = {"k": gi["scopes"]["global"]["k"], "route": gi["scopes"]["global"].get("route", "exact")}
        elif case == "kmeans8":
            X = normalize_rows(H)
            labels = clustering.kmeans(X, 8, niter=25, nredo=3, seed=0)
            info = {
                "k": 8,
                "route": "joint"
                if n >= clustering.scale.SCALE_MIN_N and not clustering.scale._faiss_gpu()
                else "faiss",
            }
        elif case == "knn_ivf":
            info = knn_ivf(normalize_rows(H), seed=0)
            labels = None
        else:
            raise SystemExit(f"unknown case {case!r}")
    c1 = resource.getrusage(resource.RUSAGE_SELF)
    if labels is not None:
        np.save(out, labels)
    return {
        "wall_s": round(time.time() - t0, 1),
        "cpu_s": round(c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime, 1),
        "peak_mb": round((mem.peak - mem.base) / 2**20),
        **info,
    }


def worst_recovery(pseudo: np.ndarray, truth: np.ndarray) -> float:
    """Per planted group, the share of it in pseudo groups where it is the majority; the worst."""
    _, p = np.unique(pseudo, return_inverse=True)
    n_true = int(truth.max()) + 1
    table = np.bincount(p.ravel() * n_true + truth, minlength=(p.max() + 1) * n_true).reshape(-1, n_true)
    owner = table.argmax(1)
    return float(
        min((table[owner == g, g].sum() / table[:, g].sum()) for g in range(table.shape[1]) if table[:, g].sum())
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="10k,100k,1M", help="comma list of " + ",".join(SIZES))
    ap.add_argument(
        "--cases",
        default="spectral,exact,anchor,kmeans8",
        help="comma list: spectral, exact, anchor, kmeans8, knn_ivf, float16",
    )
    ap.add_argument(
        "--data",
        default="heatmaps",
        choices=["heatmaps", "centres"],
        help="planted_heatmaps (a 1%% / 0.1%% minority) or planted_centres (issue 31)",
    )
    ap.add_argument("--exact-max", type=int, default=300_000, help="skip exact above this N (quadratic)")
    ap.add_argument("--dir", default=None, help="where the memmaps go (default: a temporary folder)")
    ap.add_argument("--table", default=None, help="append the markdown table to this file")
    ap.add_argument(
        "--anchor-mean",
        type=int,
        default=None,
        help="rows averaged into each anchor (clustering_scale.ANCHOR_MEAN) for this run",
    )
    ap.add_argument("--case", nargs=4, metavar=("CASE", "PATH", "N", "OUT"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.case:
        print(json.dumps(run_case(a.case[0], a.case[1], int(a.case[2]), a.case[3])))
        return

    from sklearn.metrics import adjusted_rand_score

    from exmap_ray.clustering.scale import planted_centres, planted_heatmaps

    tmp = tempfile.TemporaryDirectory(dir=a.dir)
    rows = []
    for size in a.sizes.split(","):
        n = SIZES[size]
        path = os.path.join(tmp.name, f"h{n}.npy")
        shape = (n, 3, 7, 7) if a.data == "heatmaps" else (n, 147)
        H = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)
        if a.data == "heatmaps":
            _, truth = planted_heatmaps(n, minority=minority_for(n), seed=0, out=H)
        else:
            _, truth = planted_centres(n, seed=0, out=H)
        minority = minority_for(n) if a.data == "heatmaps" else 0.01
        H.flush()
        del H
        np.save(path.replace(".npy", "_y.npy"), truth // 2)
        labels = {}
        for case in a.cases.split(","):
            if case in ("exact", "knn_ivf", "float16") and n > a.exact_max:
                continue
            out = os.path.join(tmp.name, f"l{n}_{case}.npy")
            load0 = os.getloadavg()[0]
            env = {**os.environ, **({"ANCHOR_MEAN": str(a.anchor_mean)} if a.anchor_mean else {})}
            r = subprocess.run(
                [sys.executable, __file__, "--case", case, path, str(n), out], capture_output=True, text=True, env=env
            )
            if r.returncode:
                print(r.stderr[-3000:], file=sys.stderr)
                res = {"error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"rc {r.returncode}"}
            else:
                res = json.loads(r.stdout.strip().splitlines()[-1])
            res = {
                "n": size,
                "data": a.data,
                "case": case,
                "minority": minority,
                **({"anchor_mean": a.anchor_mean} if a.anchor_mean else {}),
                "load": f"{load0:.1f}-{os.getloadavg()[0]:.1f}",
                "budget_mb": round((2 * n * 147 * 4) / 2**20 + 300),
                **res,
            }
            if os.path.exists(out) and case != "kmeans8":
                labels[case] = np.load(out)
                res["ari_planted"] = round(float(adjusted_rand_score(truth, labels[case])), 4)
                res["worst_recovery"] = round(worst_recovery(labels[case], truth), 4)
                ref = labels.get("exact") if case != "exact" else None
                if case == "float16" and "spectral" in labels:
                    ref = labels["spectral"]
                if ref is not None:
                    res["ari_vs_ref"] = round(float(adjusted_rand_score(ref, labels[case])), 4)
            print(json.dumps(res), flush=True)
            rows.append(res)
        os.remove(path)
    cols = [
        "n",
        "data",
        "case",
        "route",
        "k",
        "wall_s",
        "cpu_s",
        "peak_mb",
        "budget_mb",
        "ari_planted",
        "ari_vs_ref",
        "worst_recovery",
        "eig_3_5",
        "anchor_mean",
        "minority",
        "load",
        "recall",
        "graph_s",
        "eigsh_s",
        "error",
    ]
    cols = [c for c in cols if any(c in r for r in rows)]
    md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    print("\n".join(md))
    if a.table:
        with open(a.table, "a") as f:
            f.write(
                f"\n`python benchmarks/cluster_scale.py {' '.join(sys.argv[1:])}` "
                f"({time.strftime('%Y-%m-%d %H:%M')} UTC, "
                f"load average {os.getloadavg()[0]:.1f} at the end)\n\n" + "\n".join(md) + "\n"
            )


if __name__ == "__main__":
    main()
