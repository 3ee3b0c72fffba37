"""`exmap-ray bench --zoo`: every family of the shortcut zoo x seeds, every group-source row.

    exmap-ray bench --zoo --quick --out runs/zoo-quick           # the protocol's quick subset (dev seeds)
    exmap-ray bench --zoo --seeds judge --out runs/zoo-judge     # the judge seeds: what decides a default
    exmap-ray bench --zoo --families zoo_patch,zoo_frame --seeds 0,1

The families and seeds come from the protocol file (`zoo_protocol.yaml` beside this module): dev seeds
to develop on, judge seeds fixed before any run, and the quick subset. For each family and seed, ERM and
the heatmaps are computed once through the stage cache and shared by every row:

- ERM; oracle DFR (true val groups: the bound);
- ExMap as shipped (the family's spec: what `exmap-ray run FAMILY` gives);
- ExMap, the shipped sweep's label-free pick: every trial of `FAMILY_sweep` run here, in this process,
  and chosen the way `exmap-ray tune` chooses (selection.pick_among), with the sweep's best
  trial by test WGA beside it (for the gap between the pick and the best);
- feature clustering, JTT's error set and random groups, each + its retrainer; SpuCo's GEORGE, SPARE and
  EIIL where the `peers` extra is installed; DPE (no group labels) where the `dpe` extra is.

Writes OUT/zoo.md (one table per family, then the summary: mean WGA, the gap to the oracle, the worst
recovery and the mean rank per row), zoo.json, zoo_per_seed.json (written after every family and seed,
so a crash keeps what was done) and zoo_wga.png (families x rows, at a glance).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
from pathlib import Path

import numpy as np
import yaml

from . import plots
from .bench import aggregate, dpe_rows, peer_rows
from .errors import UserError, did_you_mean
from .pipeline import evaluate_row, pick_groups, preflight, start_job
from .resources import resolve_resources
from .search import parse_space, unflatten
from .selection import pick_among
from .spec import SHIPPED, Spec, load_spec, shipped_specs
from .stages import Timer, compute_upstream
from .storage import write_json

log = logging.getLogger(__name__)
PROTOCOL = Path(__file__).with_name("zoo_protocol.yaml")
ORACLE, SHIPPED_ROW, PICK_ROW = "oracle DFR (true groups)", "ExMap (shipped)", "ExMap (sweep pick)"
PICK_VARIANTS = "ExMap (pick of variants)"  # the label-free choice among the shipped spec and --variant rows
# (row, group source, retrainer) besides the ExMap rows; the label-free rows are every row but the oracle
BASE_ROWS = [
    ("ERM", None, None),
    (ORACLE, "true", "dfr"),
    ("feature clustering + DFR", "features", "dfr"),
    ("JTT (ERM error set)", "jtt_error_set", "jtt"),
    ("random groups + DFR", "random", "dfr"),
]


def protocol(path: Path = PROTOCOL) -> dict:
    """The protocol file: families, dev and judge seeds, the quick subset."""
    p = yaml.safe_load(Path(path).read_text())
    for key in ("families", "dev_seeds", "judge_seeds", "quick"):
        if key not in p:
            raise UserError(f"zoo protocol '{path}': key '{key}' is missing")
    return p


def choose_seeds(arg: str | None, proto: dict, quick: bool) -> list[int]:
    """--seeds: a seed set of the protocol by name (its NAME_seeds keys: dev, judge, judge2, ...), or
    comma-separated integers; default: quick's seeds or the dev seeds."""
    if arg is None:
        return list(proto["quick"]["seeds"] if quick else proto["dev_seeds"])
    if f"{arg}_seeds" in proto:
        return list(proto[f"{arg}_seeds"])
    try:
        return [int(s) for s in arg.split(",") if s.strip()]
    except ValueError:
        names = ", ".join(f"'{k.removesuffix('_seeds')}'" for k in proto if k.endswith("_seeds"))
        raise UserError(f"--seeds {arg!r}: give {names} (the protocol's) or integers such as 0,1,2") from None


def choose_families(arg: str | None, proto: dict, quick: bool) -> list[str]:
    fams = list(proto["quick"].get("families") or proto["families"]) if quick else list(proto["families"])
    if arg:
        fams = [f.strip() for f in arg.split(",") if f.strip()]
    known = shipped_specs()
    for f in fams:
        if f not in known:
            raise UserError(
                f"zoo family '{f}' has no shipped spec.{did_you_mean(f, known)} Families: "
                f"{', '.join(proto['families'])}"
            )
    return fams


def sweep_trials(family: str, seed: int, sets: list[str]) -> tuple[list[Spec], list[str]]:
    """Every trial spec of the family's shipped sweep (grid domains), and each trial's config in words."""
    name = f"{family}_sweep"
    if name not in shipped_specs():
        return [], []
    base = load_spec(name, [*sets, f"seed={seed}"])
    domains = parse_space(base)
    if any(d.kind != "grid" for d in domains):
        raise UserError(
            f"spec '{name}': bench --zoo runs grid domains only; "
            f"{[d.key for d in domains if d.kind != 'grid']} are sampled"
        )
    specs, words = [], []
    for values in itertools.product(*(d.values for d in domains)):
        config = {d.key: v for d, v in zip(domains, values)}
        specs.append(load_spec(SHIPPED / f"{family}.yaml", [*sets, f"seed={seed}"], extra=unflatten(config)))
        words.append(", ".join(f"{k}={v}" for k, v in config.items()))
    return specs, words


def _row(name: str, family: str, seed: int, r, source: str | None, extra: dict | None = None) -> dict:
    row = {
        "row": name,
        "family": family,
        "seed": seed,
        "test_wga": r.test["worst_group_acc"],
        "test_mean_acc": r.test["mean_acc"],
        **(extra or {}),
    }
    if source is not None:
        row.update(
            n_groups=int(r.group_info["n_groups"]), ari=r.agreement["ari"], worst_recovery=r.agreement["worst_recovery"]
        )
    return row


def parse_variant(text: str) -> tuple[str, list[str]]:
    """--variant 'NAME:key=value,key=value' -> (NAME, ['key=value', ...]): an extra ExMap row, the family's
    spec with these keys set (e.g. 'both:clustering.input=both')."""
    name, sep, rest = text.partition(":")
    sets = [kv.strip() for kv in rest.split(",") if kv.strip()]
    if not sep or not name.strip() or not sets or any("=" not in kv for kv in sets):
        raise UserError(
            f"--variant {text!r}: expected NAME:key=value[,key=value...], e.g. 'both:clustering.input=both'"
        )
    return name.strip(), sets


def label_free_pick(results: list, spec: Spec, y: np.ndarray) -> tuple[int, int]:
    """Among rows fitted on the same val (each a (Row, its val pseudo groups)), the one `exmap-ray tune`
    would choose (spec.search's metric, select and se; selection.pick_among), and the one with the best test
    WGA: indices."""
    s = spec.search
    pick, _ = pick_among(results, y, s.metric, s.select, s.se)
    best = max(range(len(results)), key=lambda i: results[i][0].test["worst_group_acc"])
    return pick, best


def run_row(spec: Spec, data, up, cache, timer: Timer, own=None) -> tuple:
    """The robust row `exmap-ray run` computes for `spec` on the shared upstream `up`: its groups (the
    `groups.pick_among` choice where the spec has one), retrained. `own`: the spec's upstream where the
    caller has it. (Row, val pseudo groups, {"pick": the chosen entry} or None)."""
    own = own or compute_upstream(spec, data, cache, timer, have=up)
    chosen, cup, picked, row = pick_groups(spec, data, own, cache, timer)
    r = row or evaluate_row(
        chosen,
        data,
        cup,
        chosen.groups.source,
        chosen.retrain.method,
        groups=cup.pseudo,
        group_info=cup.info["clusters"],
    )
    return r, cup.pseudo, {"pick": picked["chosen"]} if picked else None


def family_seed(
    family: str,
    seed: int,
    sets: list[str],
    cache,
    timer: Timer,
    variants: list[tuple[str, list[str]]] = (),
    sweep: bool = True,
    baselines: bool = True,
    peers: bool = True,
) -> list[dict]:
    """Every row of one family and seed, on one shared upstream; `variants` add ExMap rows with keys set,
    and a row "ExMap (pick of variants)": the label-free choice among the shipped spec and the variants."""
    spec = resolve_resources(load_spec(SHIPPED / f"{family}.yaml", [*sets, f"seed={seed}"]))
    data = preflight(spec, check_model=False)
    up = compute_upstream(spec, data, cache, timer)
    rows = []
    extra = [(n, s, r) for n, s, _, r in peer_rows() + dpe_rows()] if peers else []
    for name, source, retrainer in (BASE_ROWS + extra) if baselines else BASE_ROWS[:2]:
        r = evaluate_row(spec, data, up, source, retrainer)
        rows.append(_row(name, family, seed, r, source))
    shipped, pseudo, picked = run_row(spec, data, up, cache, timer, own=up)  # what `exmap-ray run FAMILY` gives
    rows.insert(2, _row(SHIPPED_ROW, family, seed, shipped, spec.groups.source, picked))
    candidates = [(shipped, pseudo, "shipped")]
    for k, (vname, vsets) in enumerate(variants):
        # a variant row is its keys as given, not a pick among the family spec's entries (unless it sets its own)
        own = [] if any(w.split("=", 1)[0].strip() == "groups.pick_among" for w in vsets) else ["groups.pick_among=[]"]
        v = dataclasses.replace(
            load_spec(SHIPPED / f"{family}.yaml", [*sets, *vsets, *own, f"seed={seed}"]), resources=spec.resources
        )
        r, vpseudo, picked = run_row(v, data, up, cache, timer)
        extra = {"variant": ",".join(vsets), **(picked or {})}
        rows.insert(3 + k, _row(f"ExMap ({vname})", family, seed, r, v.groups.source, extra))
        candidates.append((r, vpseudo, vname))
    if variants:
        pick, best = label_free_pick([(r, g) for r, g, _ in candidates], spec, data.val.y)
        rows.insert(
            3 + len(variants),
            _row(
                PICK_VARIANTS,
                family,
                seed,
                candidates[pick][0],
                spec.groups.source,
                {
                    "pick": candidates[pick][2],
                    "sweep_best": candidates[best][2],
                    "sweep_best_wga": candidates[best][0].test["worst_group_acc"],
                    "n_trials": len(candidates),
                },
            ),
        )
    trials, words = sweep_trials(family, seed, sets) if sweep else ([], [])
    if trials:  # the label-free pick of the shipped sweep, chosen as `exmap-ray tune` chooses
        results = []
        for t in trials:
            t = dataclasses.replace(t, resources=spec.resources)
            r, tpseudo, _ = run_row(t, data, up, cache, timer)
            results.append((r, tpseudo))
        pick, best = label_free_pick(results, trials[0], data.val.y)
        rows.insert(
            3 + len(variants) + bool(variants),
            _row(
                PICK_ROW,
                family,
                seed,
                results[pick][0],
                "exmap",
                {
                    "pick": words[pick],
                    "sweep_best_wga": results[best][0].test["worst_group_acc"],
                    "sweep_best": words[best],
                    "n_trials": len(trials),
                },
            ),
        )
    for r in rows:
        log.info("zoo %s seed %d: %-26s test WGA %.3f", family, seed, r["row"], r["test_wga"])
    return rows


def summarize(per_seed: list[dict], families: list[str]) -> tuple[dict[str, list[dict]], list[dict]]:
    """Per family: each row's mean and std over seeds. Over families: mean WGA, mean gap to the oracle,
    the worst recovery anywhere, and the mean rank among the label-free rows (1 = best; ties share)."""
    by_family = {f: aggregate([r for r in per_seed if r["family"] == f]) for f in families}
    by_family = {f: rows for f, rows in by_family.items() if rows}
    names = list(dict.fromkeys(r["row"] for rows in by_family.values() for r in rows))
    summary = []
    for name in names:
        wgas, gaps, recs, ranks = [], [], [], []
        for f, rows in by_family.items():
            mine = next((r for r in rows if r["row"] == name), None)
            oracle = next((r for r in rows if r["row"] == ORACLE), None)
            if mine is None:
                continue
            wgas.append(mine["test_wga"])
            if oracle is not None:
                gaps.append(oracle["test_wga"] - mine["test_wga"])
            recs += [
                r["worst_recovery"]
                for r in per_seed
                if r["family"] == f and r["row"] == name and r.get("worst_recovery") is not None
            ]
            if name != ORACLE:
                field = sorted((r["test_wga"] for r in rows if r["row"] != ORACLE), reverse=True)
                ranks.append(1 + sum(v > mine["test_wga"] + 1e-12 for v in field))
        summary.append(
            {
                "row": name,
                "families": len(wgas),
                "mean_wga": float(np.mean(wgas)),
                "mean_gap_to_oracle": float(np.mean(gaps)) if gaps else math.nan,
                "worst_recovery": float(min(recs)) if recs else math.nan,
                "mean_rank": float(np.mean(ranks)) if ranks else math.nan,
            }
        )
    return by_family, summary


def _f(v) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def format_report(
    by_family: dict, summary: list[dict], per_seed: list[dict], seeds: list[int], sets: list[str], seconds: float
) -> str:
    md = [
        f"# Shortcut zoo bench (seeds {', '.join(map(str, seeds))})",
        "",
        f"Test worst-group accuracy (WGA) per family, mean ± std over seeds; wall time {seconds / 60:.1f} min."
        + (f" Overrides: `{' '.join(sets)}`." if sets else ""),
        "",
        "## Summary over families",
        "",
        "| row | families | mean WGA | mean gap to oracle | worst recovery | mean rank (label-free rows) |",
        "|---|---|---|---|---|---|",
    ]
    for s in sorted(
        summary, key=lambda s: (s["row"] != ORACLE, s["mean_rank"] if not math.isnan(s["mean_rank"]) else 0)
    ):
        md.append(
            f"| {s['row']} | {s['families']} | {_f(s['mean_wga'])} | {_f(s['mean_gap_to_oracle'])} | "
            f"{_f(s['worst_recovery'])} | {s['mean_rank']:.2f} |"
            if not math.isnan(s["mean_rank"])
            else f"| {s['row']} | {s['families']} | {_f(s['mean_wga'])} | - | {_f(s['worst_recovery'])} | - |"
        )
    md += ["", "## Test WGA by family (mean over seeds)", ""]
    rows = [s["row"] for s in summary]
    md += ["| family | " + " | ".join(rows) + " |", "|---|" + "---|" * len(rows)]
    for f, rs in by_family.items():
        cells = {r["row"]: r for r in rs}
        md.append(f"| {f} | " + " | ".join(_f(cells[n]["test_wga"]) if n in cells else "-" for n in rows) + " |")
    for f, rs in by_family.items():
        md += [
            "",
            f"## {f}",
            "",
            "| row | test WGA | mean acc | worst recovery | pseudo groups |",
            "|---|---|---|---|---|",
        ]
        for r in rs:
            md.append(
                f"| {r['row']} | {_f(r['test_wga'])} ± {_f(r.get('test_wga_std'))} | {_f(r['test_mean_acc'])} | "
                f"{_f(r.get('worst_recovery'))} | {_f(r.get('n_groups')) if r.get('n_groups') else '-'} |"
            )
        picks = [r for r in per_seed if r["family"] == f and r["row"] in (PICK_ROW, PICK_VARIANTS)]
        for p in picks:
            md.append(
                f"\nseed {p['seed']}, {p['row']}: picked `{p['pick']}` ({_f(p['test_wga'])}); the best by "
                f"test WGA was `{p['sweep_best']}` ({_f(p['sweep_best_wga'])}), of {p['n_trials']} trials."
            )
    return "\n".join(md) + "\n"


def run_zoo(
    families: list[str],
    seeds: list[int],
    out,
    cache_dir=None,
    tracking_uri: str | None = None,
    sets: list[str] | None = None,
    variants: list[tuple[str, list[str]]] = (),
    sweep: bool = True,
    baselines: bool = True,
    peers: bool = True,
) -> dict:
    import time

    sets = list(sets or [])
    t0 = time.perf_counter()
    job = start_job(load_spec(SHIPPED / f"{families[0]}.yaml", sets), out, cache_dir, tracking_uri)
    out, timer = job.out, job.timer
    per_seed: list[dict] = []
    done = 0
    for family in families:
        for seed in seeds:
            with timer(f"{family} seed {seed}"):
                per_seed += family_seed(family, seed, sets, job.cache, timer, variants, sweep, baselines, peers)
            done += 1
            log.info(
                "zoo: %d of %d family-seeds done (%.1f min)",
                done,
                len(families) * len(seeds),
                (time.perf_counter() - t0) / 60,
            )
            write_json(out / "zoo_per_seed.json", per_seed)
    by_family, summary = summarize(per_seed, families)
    seconds = time.perf_counter() - t0
    report = format_report(by_family, summary, per_seed, seeds, sets, seconds)
    (out / "zoo.md").write_text(report)
    write_json(
        out / "zoo.json",
        {
            "families": families,
            "seeds": seeds,
            "sets": sets,
            "summary": summary,
            "by_family": by_family,
            "per_seed": per_seed,
            "seconds": seconds,
            "timings_s": timer.seconds,
        },
    )
    plots.zoo_grid(
        by_family, [s["row"] for s in summary], out / "zoo_wga.png", f"test WGA, seeds {', '.join(map(str, seeds))}"
    )
    return {"report": report, "summary": summary, "by_family": by_family, "seconds": seconds}
