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

from exmap_ray.bench_zoo import ORACLE, summarize


def short(family: str) -> str:
    """zoo_frame_patch -> frame+patch, as the tables name families."""
    return family.replace("zoo_", "").replace("_", "+")


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
    rows = [r for r in rows if r["row"] != "ERM"]
    fams = list(dict.fromkeys(r["family"] for r in rows))
    by_family, summary = summarize(rows, fams)  # bench --zoo's own means over seeds and mean ranks
    names = [s["row"] for s in summary]
    mean = {(f, r["row"]): r["test_wga"] for f, rs in by_family.items() for r in rs}
    if a.plot:
        from pathlib import Path

        from exmap_ray import plots

        plots.zoo_grid(by_family, names, Path(a.plot), "test WGA, mean over seeds")
    free = [n for n in names if n != ORACLE]
    print("| family | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for f in fams:
        top = max(mean[f, n] for n in free)
        cells = [f"**{mean[f, n]:.3f}**" if n in free and mean[f, n] == top else f"{mean[f, n]:.3f}" for n in names]
        print(f"| {short(f)} | " + " | ".join(cells) + " |")
    print("| **mean** | " + " | ".join(f"{s['mean_wga']:.3f}" for s in summary) + " |")
    print("| mean rank | " + " | ".join("-" if s["row"] == ORACLE else f"{s['mean_rank']:.2f}" for s in summary) + " |")


if __name__ == "__main__":
    main()
