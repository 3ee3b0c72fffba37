"""`exmap-ray bench SPEC --seeds N`: ExMap against the baselines people cite, over seeds.

    exmap-ray bench cmnist --seeds 3 --out runs/bench-cmnist

For each seed, the upstream (ERM, features, heatmaps) is computed once through the stage cache
and shared by every row. Each row is a group source (exmap_ray.groups) plus a retrainer
(exmap_ray.retrain) fitted on val; its groups are compared with the true val groups (ARI, the
worst true group's recovery) and its predictions are scored on test. True groups enter only the
oracle row and the evaluation. Writes OUT/bench.{md,csv,json} and a bar plot, and logs them with
every row's mean metrics to one MLflow run.
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
from .groups import GroupContext, infer_groups
from .heatmaps.extract import HeatmapStore
from .metrics import agreement, evaluate
from .pipeline import Timer, end_to_end_stage, preflight, run_stages
from .retrain import RETRAINERS
from .spec import Spec, from_dict, stage_seed
from .resources import resolve_resources
from .storage import Loc
from .store import StageCache, load_npy, write_json

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
# with --end-to-end: the ExMap groups of the spec's clustering, fine-tuning the whole network (retrain.e2e_*)
E2E_ROWS = [
    ("ExMap + GroupDRO (end to end)", "exmap", None, "groupdro"),
    ("ExMap + JTT (end to end)", "exmap", None, "jtt"),
]
METRICS = ["test_wga", "test_mean_acc", "ari", "worst_recovery"]


def bench_seed(spec: Spec, cache: StageCache, timer: Timer, end_to_end: bool = False) -> list[dict]:
    """Every row for one seed (spec.seed), sharing one ERM model and one heatmap store.

    `end_to_end` adds E2E_ROWS: GroupDRO and JTT fine-tuning the whole ERM network on the ExMap groups.
    """
    # the rows choose their own retrainers; the spec's retrain.mode only matters for the E2E rows
    spec = dataclasses.replace(spec, retrain=dataclasses.replace(spec.retrain, mode="last_layer"))
    data = preflight(spec)
    s = run_stages(spec, data, cache, timer)
    H = HeatmapStore(s["stages"]["heatmaps"].dir).load()
    val, test, names = data.val, data.test, data.group_names
    ctx = GroupContext(y_val=val.y, clustering=spec.clustering, seed=stage_seed(spec.seed, "clusters"),
                       val_features=s["val_features"], val_logits=s["val_logits"], heatmaps=H,
                       true_groups=val.group)
    fit_seed = stage_seed(spec.seed, "dfr")
    rows = []
    for name, source, scope, retrainer in ROWS + (E2E_ROWS if end_to_end else []):
        row = {"row": name, "seed": spec.seed, "groups": source or "", "retrain": retrainer or ""}
        if source is None:
            pred = s["test_logits"].argmax(1)
        elif (name, source, scope, retrainer) in E2E_ROWS:
            e2e = dataclasses.replace(spec, retrain=dataclasses.replace(spec.retrain, method=retrainer,
                                                                        mode="end_to_end"))
            # the clusters stage holds the spec's own ExMap groups (cmd_bench checks groups.source)
            stage, _ = end_to_end_stage(e2e, data, cache, timer, s["stages"]["erm"], s["stages"]["clusters"])
            agree = agreement(s["pseudo"], val.group, names)
            row.update(n_groups=int(s["cluster_info"]["n_groups"]), ari=agree["ari"],
                       worst_recovery=agree["worst_recovery"])
            pred = load_npy(stage.dir / "test_pred.npy")
        else:
            c = ctx if scope is None else dataclasses.replace(
                ctx, clustering=dataclasses.replace(spec.clustering, scope=scope))
            groups, info = infer_groups(source, c)
            agree = agreement(groups, val.group, names)
            row.update(n_groups=info["n_groups"], ari=agree["ari"], worst_recovery=agree["worst_recovery"])
            model = RETRAINERS.get(retrainer).fit(s["val_features"], val.y, groups, spec, fit_seed)
            pred = model.predict(s["test_features"])
        ev = evaluate(pred, test.y, test.group, names, data.train.group)
        row.update(test_wga=ev["worst_group_acc"], test_mean_acc=ev["mean_acc"], per_group=ev["per_group"])
        if data.shortcut_metrics is not None:
            row.update({f"gap_{k}": v for k, v in data.shortcut_metrics(pred, test.y, test.attrs).items()})
        rows.append(row)
        log.info("bench seed %d: %-26s test WGA %.3f, mean acc %.3f", spec.seed, name, row["test_wga"],
                 row["test_mean_acc"])
    return rows


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
    lines = [f"| method ({spec.dataset.name}, seeds {', '.join(map(str, seeds))}) | " + " | ".join(cols) + " |",
             "|---|" + "---|" * len(cols)]
    for r in rows:
        vals = [_pm(r, k) for k in METRICS + gap_cols]
        lines.append(f"| {r['row']} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def run_bench(spec: Spec, seeds: list[int], out: Path, cache_dir: Path | None = None,
              tracking_uri: str | None = None, end_to_end: bool = False) -> dict:
    import mlflow

    out = Loc.parse(out)  # a local folder or a storage URI
    out.mkdir()
    spec = resolve_resources(spec)
    uri = tracking_uri or spec.tracking.uri or tracking.default_uri(out)
    exp_id = tracking.setup(uri, spec.tracking.experiment or spec.name, out)
    cache = StageCache(cache_dir or out / "cache")
    timer = Timer()
    per_seed: list[dict] = []
    with mlflow.start_run(experiment_id=exp_id, run_name=f"{spec.name} bench") as run:
        tracking.log_flat_params({**spec.flat(), "bench.seeds": seeds})
        for seed in seeds:
            with timer(f"seed {seed}"):
                per_seed += bench_seed(from_dict({**spec.to_dict(), "seed": seed}), cache, timer, end_to_end)
            write_json(out / "bench_per_seed.json", per_seed)  # a crash keeps the seeds already done
        rows = aggregate(per_seed)
        table = format_table(rows, spec, seeds)
        md = [f"# Benchmark: {spec.name}", "",
              f"Test worst-group accuracy (WGA), mean test accuracy, and the agreement of each method's val groups "
              f"with the true val groups (ARI; the worst true group's recovery = the share of its members in "
              f"groups it dominates), mean ± std over {len(seeds)} seed(s). True groups are used only by the "
              f"oracle row and for scoring.", "", table, ""]
        (out / "bench.md").write_text("\n".join(md))
        cols = ["row", "n_seeds"] + [k for k in rows[0] if k not in ("row", "n_seeds")]
        buf = io.StringIO(newline="")
        w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
        (out / "bench.csv").write_text(buf.getvalue())
        summary = {"rows": rows, "per_seed": per_seed, "seeds": seeds, "timings_s": timer.seconds,
                   "mlflow_run_id": run.info.run_id}
        write_json(out / "bench.json", summary)
        plots.bench_bars(rows, out / "bench_wga.png", f"{spec.name}: test WGA over {len(seeds)} seed(s)")
        for r in rows:
            tracking.log_metrics({k: v for k, v in r.items() if isinstance(v, float)},
                                 prefix=tracking.metric_name(r["row"]).replace(" ", "_") + ".")
        for name in ("bench.md", "bench.csv", "bench.json", "bench_wga.png"):
            tracking.log_artifact(out / name)
    summary["table"] = table
    return summary
