"""One judged zoo table from two bench --zoo runs on the same cache: every row of the first, with rows of
the second added under new names (e.g. a new default beside the rows it was judged against).

    python benchmarks/studies/zoo_combine.py benchmarks/results/zoo/judge_peers_per_seed.json \
        benchmarks/results/zoo/judge_pooled_per_seed.json --take 'ExMap (shipped)=ExMap (pick, pooled)'

Prints the families x rows table of mean test WGA over seeds (bold: the best label-free row), the mean,
and each row's mean rank among the label-free rows (1 = best; ties share), from the per-seed records.
"""

from __future__ import annotations

import argparse
import json
import statistics

ORACLE = "oracle DFR (true groups)"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("base")
    ap.add_argument("extra")
    ap.add_argument("--take", action="append", default=[], help="ROW=NEW NAME: a row of EXTRA, renamed")
    ap.add_argument("--drop", action="append", default=[], help="a row of BASE to leave out")
    ap.add_argument("--rename", action="append", default=[], help="ROW=NEW NAME: a row of BASE, renamed")
    ap.add_argument("--plot", help="also write the families x rows grid (plots.zoo_grid) to this PNG")
    a = ap.parse_args()
    rows = [r for r in json.load(open(a.base)) if r["row"] not in a.drop]
    ren = dict(x.split("=", 1) for x in a.rename)
    for r in rows:
        r["row"] = ren.get(r["row"], r["row"])
    take = dict(x.split("=", 1) for x in a.take)
    rows += [{**r, "row": take[r["row"]]} for r in json.load(open(a.extra)) if r["row"] in take]
    fams = list(dict.fromkeys(r["family"] for r in rows))
    names = [n for n in dict.fromkeys(r["row"] for r in rows) if n != "ERM"]
    mean = {
        (f, n): statistics.mean(r["test_wga"] for r in rows if r["family"] == f and r["row"] == n)
        for f in fams
        for n in names
    }
    if a.plot:
        from pathlib import Path

        from exmap_ray import plots

        by_family = {f: [{"row": n, "test_wga": mean[f, n]} for n in names] for f in fams}
        plots.zoo_grid(by_family, names, Path(a.plot), "test WGA, mean over seeds")
    free = [n for n in names if n != ORACLE]
    print("| family | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    ranks = {n: [] for n in free}
    for f in fams:
        top = max(mean[f, n] for n in free)
        for n in free:
            ranks[n].append(1 + sum(mean[f, m] > mean[f, n] + 1e-12 for m in free))
        cells = [f"**{mean[f, n]:.3f}**" if n in free and mean[f, n] == top else f"{mean[f, n]:.3f}" for n in names]
        print(f"| {f.replace('zoo_', '').replace('_', '+')} | " + " | ".join(cells) + " |")
    print("| **mean** | " + " | ".join(f"{statistics.mean(mean[f, n] for f in fams):.3f}" for n in names) + " |")
    print(
        "| mean rank | " + " | ".join("-" if n == ORACLE else f"{statistics.mean(ranks[n]):.2f}" for n in names) + " |"
    )


if __name__ == "__main__":
    main()
