"""Summarise runs/split/*/results.json (spectral vs spectral_split); argv: the seeds to take (default all).

`--root runs/inputs` reads the run folders of benchmarks/studies/inputs_e2e.sh instead (TAG-INPUT-sSEED)."""

import json
import glob
import statistics as st
import sys

args = sys.argv[1:]
root = "runs/split"
if args[:1] == ["--root"]:
    root, args = args[1], args[2:]
want = {int(a) for a in args}
rows = {}
for p in sorted(glob.glob(f"{root}/*/results.json")):
    name = p.split("/")[-2]
    tag, method, seed = name.split("-", 2)
    seed, _, suffix = seed.partition("-")
    method += f"-{suffix}" if suffix else ""
    if want and int(seed[1:]) not in want:
        continue
    r = json.load(open(p))
    e, o = r["exmap"], r["oracle_dfr"]
    rows.setdefault((tag, method), []).append(
        (
            int(seed[1:]),
            e["test"]["worst_group_acc"],
            o["test"]["worst_group_acc"],
            e["n_groups"],
            round(e["worst_recovery"], 2),
        )
    )
for (tag, method), v in sorted(rows.items()):
    v.sort()
    print(
        f"{tag:6s} {method:24s} WGA " + " / ".join(f"{x[1]:.3f}" for x in v) + f"  mean {st.mean(x[1] for x in v):.3f}"
        f"  oracle " + " / ".join(f"{x[2]:.3f}" for x in v) + f" mean {st.mean(x[2] for x in v):.3f}"
        f"  groups {[x[3] for x in v]}  worst recovery {[x[4] for x in v]}"
    )
