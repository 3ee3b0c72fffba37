"""`exmap-ray bench SPEC --seeds N`: ExMap against the baselines people cite, over seeds.

    exmap-ray bench cmnist --seeds 3 --out runs/bench-cmnist

For each seed, the upstream (ERM, features, heatmaps) is computed once through the stage cache
and shared by every row. Each row is a group source (exmap_ray.groups) plus a retrainer
(exmap_ray.retrain) fitted on val; its groups are compared with the true val groups (ARI, the
worst true group's recovery) and its predictions are scored on test. True groups enter only the
oracle row and the evaluation. With the `peers` extra, SpuCo's GEORGE, SPARE and EIIL find the groups
of three more rows (PEER_ROWS), fed to the same DFR; with the `dpe` extra, Diverse Prototypical Ensembles
retrain on the same features without any group (DPE_ROWS). Writes OUT/bench.{md,csv,json} and a bar
plot, and logs them with every row's mean metrics to one MLflow run.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import math
from pathlib import Path

import numpy as np

from . import plots, tracking
from .console import tagged
from .groups import GROUP_SOURCES
from .retrain import RETRAINERS
from .pipeline import evaluate_row, pick_groups, preflight, start_job
from .resources import describe_environment, environment
from .spec import Spec, from_dict
from .stages import Timer, compute_upstream
from .cache import StageCache
from .storage import write_json

log = logging.getLogger(__name__)

# (row name, group source, clustering scope override, retrainer); None source = the ERM model itself
ROWS = [
    ("ERM", None, None, None),
    ("oracle DFR (true groups)", "true", None, "dfr"),
    ("random groups + DFR", "random", None, "dfr"),
    ("feature clustering + DFR", "features", None, "dfr"),
    ("JTT (ERM error set)", "jtt_error_set", None, "jtt"),
    ("ExMap local + DFR", "exmap", "local", "dfr"),
    ("ExMap global + DFR", "exmap", "global", "dfr"),
    ("ExMap + GroupDRO", "exmap", None, "groupdro"),
    ("ExMap + JTT", "exmap", None, "jtt"),
]
# SpuCo's group inference (exmap_ray/groups/peers.py) feeding the same DFR: rows only when the peers extra is installed
PEER_ROWS = [
    ("SpuCo GEORGE + DFR", "spuco_george", None, "dfr"),
    ("SpuCo SPARE + DFR", "spuco_spare", None, "dfr"),
    ("SpuCo EIIL + DFR", "spuco_eiil", None, "dfr"),
]
# Diverse Prototypical Ensembles (retrain/dpe.py) without attribute labels: its own retraining on the same
# frozen features, group = class (no group inferred, every choice by worst-class accuracy); with the dpe extra
DPE_ROWS = [
    ("DPE (no group labels)", "class", None, "dpe"),
]
# with --end-to-end: the ExMap groups of the spec's clustering, fine-tuning the whole network (retrain.end_to_end.*)
E2E_ROWS = [
    ("ExMap + GroupDRO (end to end)", "exmap", None, "groupdro"),
    ("ExMap + JTT (end to end)", "exmap", None, "jtt"),
]
METRICS = ["test_wga", "test_mean_acc", "ari", "worst_recovery"]


def peer_rows() -> list[tuple]:
    """PEER_ROWS whose group source is registered (all with `pip install 'exmap-ray[peers]'`, else none)."""
    return [r for r in PEER_ROWS if r[1] in GROUP_SOURCES]


def dpe_rows() -> list[tuple]:
    """DPE_ROWS whose retrainer is registered (with `pip install 'exmap-ray[dpe]'`, else none)."""
    return [r for r in DPE_ROWS if r[3] in RETRAINERS]


def _with(spec: Spec, section: str, **keys) -> Spec:
    return dataclasses.replace(spec, **{section: dataclasses.replace(getattr(spec, section), **keys)})


def bench_seed(
    spec: Spec, cache: StageCache, timer: Timer, end_to_end: bool = False, erm_envs: dict | None = None
) -> list[dict]:
    """Every row for one seed (spec.seed), sharing one ERM model and one heatmap store.

    `end_to_end` adds E2E_ROWS: GroupDRO and JTT fine-tuning the whole ERM network on the ExMap groups.
    `erm_envs`, when given, gets the environment the seed's ERM was trained in, under the seed.
    """
    # the rows choose their own retrainers; the spec's retrain.mode only matters for the E2E rows
    spec = dataclasses.replace(spec, retrain=dataclasses.replace(spec.retrain, mode="last_layer"))
    data = preflight(spec)
    up = compute_upstream(spec, data, cache, timer)
    if erm_envs is not None:
        erm_envs[spec.seed] = up.info["erm"].get("environment")
    rows = []
    peers, dpe = peer_rows(), dpe_rows()
    if not peers:
        log.info("bench: no SpuCo peer rows (pip install 'exmap-ray[peers]' adds GEORGE, SPARE and EIIL)")
    if not dpe:
        log.info("bench: no DPE row (pip install 'exmap-ray[dpe]' adds Diverse Prototypical Ensembles)")
    for name, source, scope, retrainer in ROWS + peers + dpe + (E2E_ROWS if end_to_end else []):
        with tagged(f"retrain: {name}, seed {spec.seed}"):  # the row's DFR / JTT / GroupDRO lines name it
            row = {"row": name, "seed": spec.seed, "groups": source or "", "retrain": retrainer or ""}
            if (name, source, scope, retrainer) in E2E_ROWS:
                e2e = dataclasses.replace(
                    spec, retrain=dataclasses.replace(spec.retrain, method=retrainer, mode="end_to_end")
                )
                # the clusters stage holds the spec's own ExMap groups (cmd_bench checks groups.source)
                e2e_up = compute_upstream(e2e, data, cache, timer, have=up)
                r = evaluate_row(
                    e2e,
                    data,
                    e2e_up,
                    source,
                    retrainer,
                    groups=e2e_up.pseudo,
                    group_info=e2e_up.info["clusters"],
                    mode="end_to_end",
                )
            elif source == "exmap" and spec.groups.pick_among:  # as `run` gives it: the entries' label-free pick
                s = spec if scope is None else _with(spec, "clustering", scope=scope)
                s = _with(s, "retrain", method=retrainer)
                # bench runs last-layer rows of the exmap source: pick_groups always picks and retrains here
                _, _, picked, r = pick_groups(s, data, compute_upstream(s, data, cache, timer, have=up), cache, timer)
                row["pick"] = picked["chosen"]
            else:
                r = evaluate_row(spec, data, up, source, retrainer, scope=scope)
            if source is not None:
                row.update(
                    n_groups=int(r.group_info["n_groups"]),
                    ari=r.agreement["ari"],
                    worst_recovery=r.agreement["worst_recovery"],
                )
            row.update(
                test_wga=r.test["worst_group_acc"], test_mean_acc=r.test["mean_acc"], per_group=r.test["per_group"]
            )
            row.update({f"gap_{k}": v for k, v in r.test.get("shortcut_gaps", {}).items()})
            rows.append(row)
            log.info(
                "bench seed %d: %-26s test WGA %.3f, mean acc %.3f",
                spec.seed,
                name,
                row["test_wga"],
                row["test_mean_acc"],
            )
    return rows


def erm_environments(erm_envs: dict) -> str:
    """The seeds' ERM environments in one line: one description when they agree, else one per seed."""
    described = {seed: describe_environment(env) for seed, env in erm_envs.items()}
    if len(set(described.values())) > 1:
        return "; ".join(f"seed {seed}: {d}" for seed, d in described.items())
    return next(iter(described.values()), describe_environment(None))


def aggregate(per_seed: list[dict]) -> list[dict]:
    """Mean and std over seeds for every numeric column, per row, in ROWS order."""
    out = []
    for name in dict.fromkeys(r["row"] for r in per_seed):  # ROWS order, then E2E_ROWS
        rs = [r for r in per_seed if r["row"] == name]
        agg = {"row": name, "n_seeds": len(rs)}
        keys = [k for k in rs[0] if isinstance(rs[0][k], (int, float)) and k != "seed"]
        for k in keys:
            vals = np.array([r.get(k, np.nan) for r in rs], float)
            agg[k] = float(np.nanmean(vals)) if np.isfinite(vals).any() else float("nan")
            agg[k + "_std"] = float(np.nanstd(vals)) if np.isfinite(vals).any() else float("nan")
        out.append(agg)
    return out


def _pm(row: dict, k: str) -> str:
    v = row.get(k)
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.3f} ± {row[k + '_std']:.3f}"


def format_table(rows: list[dict], spec: Spec, seeds: list[int]) -> str:
    gap_cols = [k for k in rows[0] if k.startswith("gap_") and not k.endswith("_std")]
    cols = ["test WGA", "mean acc", "ARI (val groups)", "worst-group recovery"] + [c[4:] for c in gap_cols]
    lines = [
        f"| method ({spec.dataset.name}, seeds {', '.join(map(str, seeds))}) | " + " | ".join(cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for r in rows:
        vals = [_pm(r, k) for k in METRICS + gap_cols]
        lines.append(f"| {r['row']} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def format_per_seed(per_seed: list[dict]) -> str:
    """Each seed's test WGA per row, with the row's pseudo-group count and worst recovery where it has groups."""
    seeds = sorted({r["seed"] for r in per_seed})
    by_row: dict[str, dict[int, dict]] = {}
    for r in per_seed:
        by_row.setdefault(r["row"], {})[r["seed"]] = r
    lines = ["| method | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|" + "---|" * len(seeds)]
    for name, rs in by_row.items():
        cells = []
        for s in seeds:
            r = rs.get(s)
            cell = "" if r is None else f"{r['test_wga']:.3f}"
            if r is not None and r.get("n_groups") is not None:
                cell += f" ({r['n_groups']} groups, recovery {r['worst_recovery']:.2f})"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_bench(
    spec: Spec,
    seeds: list[int],
    out: Path,
    cache_dir: Path | None = None,
    tracking_uri: str | None = None,
    end_to_end: bool = False,
) -> dict:
    """Every row over `seeds`, to OUT/bench.{md,csv,json}, bench_wga.png and one MLflow run. A tracking
    server lost mid-bench stops the logging, not the bench: OUT/mlflow_pending.json says what was lost,
    and `exmap-ray sync-mlflow OUT` logs it later (from bench.json and spec.resolved.json)."""
    job = start_job(spec, out, cache_dir, tracking_uri)
    spec, out, tracker, timer = job.spec, job.out, job.tracker, job.timer
    per_seed: list[dict] = []
    erm_envs: dict = {}  # seed -> the environment its ERM was trained in
    with tracker.run(experiment_id=job.exp_id, run_name=f"{spec.name} bench"):
        write_json(out / "spec.resolved.json", spec.to_dict())  # what sync-mlflow logs as params
        tracker.call("log_params", tracking.log_flat_params, tracking.bench_params(spec.to_dict(), seeds))
        for seed in seeds:
            with timer(f"seed {seed}"):
                per_seed += bench_seed(
                    from_dict({**spec.to_dict(), "seed": seed}), job.cache, timer, end_to_end, erm_envs
                )
            write_json(out / "bench_per_seed.json", per_seed)  # a crash keeps the seeds already done
        rows = aggregate(per_seed)
        table = format_table(rows, spec, seeds)
        md = [
            f"# Benchmark: {spec.name}",
            "",
            f"Test worst-group accuracy (WGA), mean test accuracy, and the agreement of each method's val groups "
            f"with the true val groups (ARI; the worst true group's recovery = the share of its members in "
            f"groups it dominates), mean ± std over {len(seeds)} seed(s). True groups are used only by the "
            f"oracle row and for scoring.",
            "",
            table,
            "",
            "Per seed: test WGA (the row's number of val pseudo groups, the worst true group's recovery).",
            "",
            format_per_seed(per_seed),
            "",
            "ERM trained with: " + erm_environments(erm_envs),
            "",
        ]
        (out / "bench.md").write_text("\n".join(md))
        cols = ["row", "n_seeds"] + [k for k in rows[0] if k not in ("row", "n_seeds")]
        buf = io.StringIO(newline="")
        w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
        (out / "bench.csv").write_text(buf.getvalue())
        summary = {
            "rows": rows,
            "per_seed": per_seed,
            "seeds": seeds,
            "timings_s": timer.seconds,
            "mlflow_run_id": tracker.run_id,
            "environment": {"driver": environment(), "erm": erm_envs},
        }
        write_json(out / "bench.json", summary)
        plots.bench_bars(rows, out / "bench_wga.png", f"{spec.name}: test WGA over {len(seeds)} seed(s)")
        tracker.call("log_metrics", tracking.log_metrics, tracking.bench_metrics(rows))
        for name in BENCH_ARTIFACTS:
            tracker.call("log_artifact", tracking.log_artifact, out / name)
    summary["table"] = table
    summary["mlflow_pending"] = tracker.pending
    return summary


BENCH_ARTIFACTS = tracking.BENCH_ARTIFACTS  # (the names sync-mlflow logs too)
