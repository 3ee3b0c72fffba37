r"""One ExMap run over the stage graph (stages.py): set-up, the evaluation every table shares, the results.

    from exmap_ray.pipeline import run_pipeline
    results = run_pipeline(spec, out=Path("runs/demo"))     # needs ray.init() first

dataset -> erm -> features ---------------------------> retrain (pseudo groups) -> evaluate
                \-> heatmaps -> clusters (pseudo groups) -/  DFR (true groups: oracle row)

Stages are cached under `cache_dir` (default OUT/cache) by a hash of their
config and upstream keys, so re-running a spec (or a sweep trial sharing the
upstream) reuses ERM and heatmaps. Everything is logged to one MLflow run.
`start_job` is the set-up `run`, `tune` and `bench` share (tracking, tracker, cache);
`evaluate_row` scores one row (a group source and a retrainer on an upstream) for all three.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable
from pathlib import Path

import numpy as np

from . import plots, tracking
from .console import tagged
from .data import GroupData, build_dataset
from .data.layout import check_before_run
from .heatmaps.extract import HeatmapShards
from .metrics import agreement, evaluate
from .errors import DataError, UserError
from .heatmaps import HEATMAP_METHODS
from .models import create_model, find_weights
from .clustering.clusterers import check_k
from .groups import infer_groups
from .retrain import RETRAINERS, LastLayerResult, RetrainedModel
from .retrain.dfr import MIN_GROUP_SIZE as DFR_MIN_GROUP_SIZE
from .hashing import RETRAIN_SEED
from .spec import Spec, pick_variants, stage_seed
from .stages import Timer, Upstream, compute_upstream, group_context
from .resources import check_gpu_nodes, environment, resolve_resources
from .storage import Loc
from .cache import StageCache
from .storage import save_npz, write_json

log = logging.getLogger(__name__)
RETRAIN_NAMES = {"dfr": "DFR", "groupdro": "GroupDRO", "jtt": "JTT"}  # for tables and plots


def retrain_label(method: str, mode: str = "last_layer") -> str:
    name = RETRAIN_NAMES.get(method, method)
    return f"{name} (end to end)" if mode == "end_to_end" else name


def preflight(spec: Spec, check_model: bool = True) -> GroupData:
    """Everything checkable before Ray work starts: the data, the backbone, the method names.

    Building the heatmap method on an untrained model makes LRP refuse an unsupported
    architecture now rather than inside an actor after ERM. `check_model` False leaves that out
    (a sweep's trial whose model and heatmap keys the sweep's driver checked already).
    """
    if spec.model.pretrained is not None:  # missing weights fail at once, not after the data checks
        find_weights(spec.model.pretrained, spec.model.backbone)
    check_before_run(spec.dataset)  # on disk: as `exmap-ray datasets check` (layout, every unreadable image)
    data = build_dataset(spec.dataset, spec.seed)
    if check_model:
        model = create_model(spec.model.backbone, data.n_classes, spec.model.pretrained)
        HEATMAP_METHODS.get(spec.heatmaps.method)(model, spec.heatmaps)
    k = spec.clustering.k
    if k != "auto":
        counts = np.bincount(data.val.y)
        c = int(np.argmin(np.where(counts > 0, counts, len(data.val) + 1)))
        smallest, where = (
            (int(counts[c]), f"the local scope (class {c})")
            if spec.clustering.scope == "local"
            else (len(data.val), "the global scope")
        )
        check_k(k, smallest, where)
    sizes = np.bincount(data.val.group, minlength=data.n_groups)
    tiny = [g for g in range(len(sizes)) if 0 < sizes[g] < DFR_MIN_GROUP_SIZE]
    if tiny:
        raise DataError(
            f"dataset '{spec.dataset.name}': true group '{data.group_names[tiny[0]]}' has "
            f"{sizes[tiny[0]]} val member(s); the oracle DFR row needs at least {DFR_MIN_GROUP_SIZE} "
            f"per group. Enlarge the val split (dataset.n_val for cmnist) or weaken the shortcut"
        )
    return data


@dataclass
class Job:
    """What a driver (`run`, `tune`, `bench`) sets up before its stages: output, tracking and cache."""

    spec: Spec  # resources resolved: part of every stage key
    out: Loc
    uri: str  # the MLflow tracking URI
    experiment: str
    exp_id: str | None  # None when the server was lost at set-up (a sweep's trial goes on)
    tracker: tracking.Tracker  # every MLflow call of the job: losing the server loses no results
    cache: StageCache
    timer: Timer


def start_job(
    spec: Spec,
    out,
    cache_dir=None,
    tracking_uri: str | None = None,
    *,
    lost_ok: bool = False,
    timer: Timer | None = None,
    later: str = "sync-mlflow",
) -> Job:
    """Make OUT, resolve the spec's resources once, point MLflow at the tracking URI, open the stage cache.

    `lost_ok`: a tracking server that fails here is recorded on the tracker (nothing is sent to it, the
    results are kept for `sync-mlflow`) instead of stopping the job: a sweep's trial, whose driver
    probed the server already. `later`: what the tracker tells the user to do about lost logging
    (tracking.Tracker)."""
    out = Loc.parse(out)
    out.mkdir()
    spec = resolve_resources(spec)  # once, before any stage: part of every stage key
    check_gpu_nodes(spec)  # a GPU node whose torch sees no CUDA: exit 2 now, naming it (drivers only)
    uri = tracking_uri or spec.tracking.uri or tracking.default_uri(out)
    experiment = spec.tracking.experiment or spec.name
    lost = None
    try:
        exp_id = tracking.setup(uri, experiment, out)
    except UserError as e:
        if not lost_ok:
            raise
        exp_id, lost = None, e
    cache = StageCache(cache_dir or out / "cache")
    tracker = tracking.Tracker(uri, out, experiment, later=later)
    if lost is not None:
        tracker.mark_lost("setup", lost)
    return Job(spec, out, uri, experiment, exp_id, tracker, cache, timer or Timer())


def run_pipeline(
    spec: Spec,
    out,
    cache_dir=None,
    tracking_uri: str | None = None,
    data: GroupData | None = None,
    parent_run_id: str | None = None,
    run_name: str | None = None,
    run_tags: dict | None = None,
    fence: Callable[[str], None] | None = None,
) -> dict:
    """The whole pipeline once. `out` and `cache_dir` are local paths or storage URIs (storage.Loc).
    `run_tags`: more MLflow tags for the run (a sweep's trial tags its sweep attempt). `fence(where)` (a
    sweep's trial, fence.check) raises `Fenced` once a resumed sweep owns the folder: it is called when the
    MLflow run has been created and before the results are written, and the run then ends KILLED."""
    timer = Timer()
    with timer("dataset"):
        data = data or preflight(spec)
        log.info(
            "dataset %s: train %d, val %d, test %d, %d classes, %d true groups (evaluation only)",
            spec.dataset.name,
            len(data.train),
            len(data.val),
            len(data.test),
            data.n_classes,
            data.n_groups,
        )
    # a run on its own: the CLI probed the server, so a failure at set-up is a real fault; a sweep's trial
    # goes on when the server went away after the sweep started
    with tagged("setup"):
        job = start_job(spec, out, cache_dir, tracking_uri, lost_ok=parent_run_id is not None, timer=timer)
    spec, out, tracker = job.spec, job.out, job.tracker
    tags = {**({"mlflow.parentRunId": parent_run_id} if parent_run_id else {}), **(run_tags or {})} or None
    with tracker.run(experiment_id=job.exp_id, run_name=run_name or spec.name, tags=tags):
        if fence:
            fence("the start of its MLflow run")
        tracker.call("log_params", tracking.log_flat_params, spec.flat())
        write_json(out / "spec.resolved.json", spec.to_dict())
        up = compute_upstream(spec, data, job.cache, timer)
        for h in up.info["erm"].get("history") or []:
            tracker.call("log_metrics", tracking.log_metrics, h, "erm.", step=h["epoch"])
        chosen, up, picked, robust = pick_groups(spec, data, up, job.cache, timer)  # as is without pick_among
        results, heldout = evaluate_all(chosen, data, up, timer, robust)
        if picked:
            results["robust"]["pick"] = picked
        results.update(
            timings_s=timer.seconds,
            config=spec.to_dict(),
            mlflow_run_id=tracker.run_id,
            environment={"driver": environment(), "erm": up.info["erm"].get("environment")},
            cache={k: {"key": v.key, "dir": str(v.dir)} for k, v in up.stages.items()},
        )
        tracker.call("log_metrics", tracking.log_metrics, {k: results[k] for k in ("erm", "robust", "oracle_dfr")})
        tracker.call("log_metrics", tracking.log_metrics, {"timings_s": timer.seconds})
        save_npz(out / "selection.npz", **heldout, pseudo_groups=up.pseudo, y=data.val.y)
        results["robust"]["selection_file"] = str(out / "selection.npz")
        if fence:
            fence("its results")
        write_json(out / "results.json", results)
        make_figures(data, up, results, out, spec)
        for name in tracking.ARTIFACTS:
            tracker.call("log_artifact", tracking.log_artifact, out / name)
    return results


@dataclass
class Row:
    """One row of a results table: test metrics, and the val groups its retrainer was given (none: ERM)."""

    test: dict  # metrics.evaluate, + "shortcut_gaps" where the dataset has them
    groups: np.ndarray | None = None  # (N_val,) the groups the retrainer saw
    group_info: dict | None = None  # the group source's info: n_groups, sizes, ...
    agreement: dict | None = None  # of `groups` with the true val groups: ARI, NMI, recovery
    model: RetrainedModel | None = None  # the retrained model: chosen values, held-out val predictions


def evaluate_row(
    spec: Spec,
    data: GroupData,
    up: Upstream,
    source: str | None,
    retrainer: str | None,
    *,
    groups: np.ndarray | None = None,
    group_info: dict | None = None,
    scope: str | None = None,
    mode: str = "last_layer",
    score_groups: dict[str, np.ndarray] | None = None,
) -> Row:
    """One row of `run`'s, a trial's or `bench`'s table: val groups from a source, a retrainer fitted on
    them, its test predictions scored. The one evaluation path.

    `source` None is the ERM model itself. `groups` (with `group_info`) are given groups, e.g. the clusters
    stage's; otherwise the source infers them here (`scope` overrides clustering.scope). `mode`
    end_to_end reads the fine-tuned network of `up`'s end_to_end stage (fitted on `up.pseudo` with
    spec.retrain.method). `score_groups` are scored on the held-out halves for analysis only.
    """
    val, test, names = data.val, data.test, data.group_names
    if source is None:
        row = Row(test={})
        pred = up.test_logits.argmax(1)
    else:
        if groups is None:
            ctx = group_context(spec, val.y, val.group, up.val_features, up.val_logits, up.heatmaps, scope)
            groups, group_info = infer_groups(source, ctx)
        if mode == "end_to_end":
            from .retrain.end_to_end import EndToEndModel

            if retrainer != spec.retrain.method or groups is not up.pseudo:
                raise ValueError(
                    "an end-to-end row reads its stage: spec.retrain.method on the clusters stage's groups"
                )
            model: RetrainedModel = EndToEndModel(up.stages["end_to_end"].dir, val.y, groups, score_groups=score_groups)
        else:
            r = RETRAINERS.get(retrainer)
            head = r.fit(
                up.val_features,
                val.y,
                groups,
                r.config(spec),
                stage_seed(spec.seed, RETRAIN_SEED),
                score_groups=score_groups,
            )
            model = LastLayerResult(head, {"val": up.val_features, "test": up.test_features})
        row = Row({}, groups, group_info, agreement(groups, val.group, names), model)
        pred = model.predictions("test")
    row.test = evaluate(pred, test.y, test.group, names, data.train.group)
    if data.shortcut_metrics is not None:  # datasets with several shortcuts: per-shortcut gaps (UrbanCars)
        row.test["shortcut_gaps"] = data.shortcut_metrics(pred, test.y, test.attrs)
    return row


def pick_groups(
    spec: Spec, data: GroupData, up: Upstream, cache, timer: Timer
) -> tuple[Spec, Upstream, dict | None, Row | None]:
    """`groups.pick_among`: each entry's groups (its clusters stage, on `up`'s ERM and heatmaps), retrained
    on and scored label-free as `exmap-ray tune` scores trials; the chosen entry's spec, upstream, a record
    of the choice and its retrained row (without pick_among: `spec` and `up` as they are, None, None)."""
    from .selection import pick_among

    variants = pick_variants(spec)
    if not variants or spec.groups.source != "exmap":  # the entries set how ExMap's heatmaps are clustered
        return spec, up, None, None
    if spec.retrain.mode != "last_layer":  # one fine-tune of the whole network per entry: not done
        log.info("groups.pick_among: retrain.mode %s fine-tunes on the spec's own groups", spec.retrain.mode)
        return spec, up, None, None
    rows = []
    with timer("pick"):
        for label, v in variants:
            vup = compute_upstream(v, data, cache, timer, have=up)
            with tagged(f"pick: {label}"):
                r = evaluate_row(
                    v,
                    data,
                    vup,
                    v.groups.source,
                    v.retrain.method,
                    groups=vup.pseudo,
                    group_info=vup.info["clusters"],
                    score_groups={"true": data.val.group},  # for the chosen row's record only; never chooses
                )
            rows.append((label, v, vup, r))
        s = spec.search
        chosen, scored = pick_among(
            [(r, vup.pseudo) for _, _, vup, r in rows], data.val.y, s.metric, s.select, s.se, s.min_members
        )
    label, v, vup, row = rows[chosen]
    log.info("groups.pick_among: chose '%s' of %d (%s, %s)", label, len(rows), s.metric, s.select)
    record = {
        "chosen": label,
        "metric": s.metric,
        "select": s.select,
        "min_members": s.min_members,
        "candidates": [
            {
                "entry": lab,
                "n_groups": sc["n_groups"],
                "selection_metric": sc.get("selection_metric"),
                "selection_se": sc.get("selection_se"),
                "test_worst_group_acc": r.test["worst_group_acc"],  # for the record only: never chooses
            }
            for (lab, _, _, r), sc in zip(rows, scored)
        ],
    }
    return v, vup, record, row


def evaluate_all(
    spec: Spec, data: GroupData, up: Upstream, timer: Timer, robust: Row | None = None
) -> tuple[dict, dict]:
    """Test metrics of ERM, ExMap and oracle DFR; plus ExMap's held-out val predictions (for sweeps).
    `robust`: the ExMap row, already retrained (pick_groups' choice), else it is retrained here."""
    erm = evaluate_row(spec, data, up, None, None)
    res = {"erm": {"test": erm.test, "val_acc": float((up.val_logits.argmax(1) == data.val.y).mean())}}
    cluster_info = up.info["clusters"]
    label = "ExMap" if spec.groups.source == "exmap" else f"{spec.groups.source} groups"
    with timer("retrain"):
        with tagged(f"retrain: {label}"):  # both rows log their DFR choice: each line names its row
            # true groups scored for analysis, never used to choose
            ex = robust or evaluate_row(
                spec,
                data,
                up,
                spec.groups.source,
                spec.retrain.method,
                groups=up.pseudo,
                group_info=cluster_info,
                mode=spec.retrain.mode,
                score_groups={"true": data.val.group},
            )
        with tagged("retrain: oracle"):
            oracle = evaluate_row(spec, data, up, "true", "dfr", groups=data.val.group)
    m = ex.model
    res["robust"] = {
        "test": ex.test,
        "n_groups": int(cluster_info["n_groups"]),
        **ex.agreement,
        # int group ids, computed or reused (a reused stage's info comes back from JSON)
        "pseudo_group_sizes": {int(g): int(n) for g, n in cluster_info["sizes"].items()},
        "k_chosen": {sc: v["k"] for sc, v in cluster_info.get("scopes", {}).items()},
        "groups_source": spec.groups.source,
        "retrain": spec.retrain.method,
        "retrain_mode": spec.retrain.mode,
        "dfr_C": m.chosen.get("C"),
        "retrain_chosen": m.chosen,
        # label-free: worst pseudo-group / worst-class accuracy on held-out halves of val
        "val": {
            "worst_pseudo_group_acc": m.heldout["pseudo"],
            "worst_class_acc": m.heldout["class"],
            "oracle_worst_group_acc": m.heldout["true"],
        },
    }
    if spec.retrain.mode == "end_to_end":
        res["robust"]["end_to_end"] = up.info["end_to_end"]  # steps, final loss, GroupDRO's final q, device
    res["oracle_dfr"] = {"test": oracle.test, "dfr_C": oracle.model.chosen["C"]}
    return res, {"heldout_idx": m.heldout_idx, "heldout_pred": m.heldout_pred}


def make_figures(data: GroupData, up: Upstream, results: dict, out: Path, spec: Spec) -> None:
    label = "ExMap" if spec.groups.source == "exmap" else f"{spec.groups.source} groups"
    robust = f"{label} + {retrain_label(spec.retrain.method, spec.retrain.mode)}"
    rows = {
        "ERM": results["erm"]["test"]["per_group"],
        robust: results["robust"]["test"]["per_group"],
        "oracle DFR": results["oracle_dfr"]["test"]["per_group"],
    }
    plots.group_accuracy_bars(rows, out / "group_accuracy.png", f"{spec.name}: per-group test accuracy")
    pseudo = up.pseudo
    H = HeatmapShards(up.stages["heatmaps"].dir)  # read per heatmap shown (remote: via the node-local cache)
    pairs = up.info["clusters"].get("group_class_cluster")
    if pairs is not None and len(pairs) != int(pseudo.max()) + 1:  # a record from before merges and splits
        pairs = None
    captions = []
    for g in range(int(pseudo.max()) + 1):
        true = data.val.group[pseudo == g]
        if not len(true):
            captions.append(f"pseudo group {g}: empty")
            continue
        top = np.bincount(true, minlength=data.n_groups).argmax()
        where = f"class {pairs[g][0]}, cluster {pairs[g][1]}" if pairs else f"class {data.val.y[pseudo == g][0]}"
        captions.append(
            f"pseudo group {g}: {where}, n={len(true)}; mostly '{data.group_names[top]}' ({(true == top).mean():.0%})"
        )
    plots.heatmap_grid(
        data.val.images, H, pseudo, captions, out / "heatmaps_by_pseudo_group.png", seed=stage_seed(spec.seed, "plot")
    )


def _score(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def format_table(results: dict) -> str:
    e = results["robust"]
    label = (
        "ExMap" if e.get("groups_source", "exmap") == "exmap" else e["groups_source"]
    ) + f" + {retrain_label(e.get('retrain', 'dfr'), e.get('retrain_mode', 'last_layer'))}"
    rows = [
        ("ERM", results["erm"]),
        (label, results["robust"]),
        ("oracle DFR (true val groups)", results["oracle_dfr"]),
    ]
    lines = [f"{'method':<30} {'test WGA':>9} {'mean acc':>9} {'train-weighted':>15}", "-" * 66]
    for name, r in rows:
        t = r["test"]
        lines.append(
            f"{name:<30} {t['worst_group_acc']:>9.3f} {t['mean_acc']:>9.3f} {t['mean_acc_train_weighted']:>15.3f}"
        )
    e = results["robust"]
    pick = e.get("pick")
    lines += [
        "",
        *(
            [
                f"groups.pick_among ({pick['metric']}, {pick['select']}; label-free): chose '{pick['chosen']}'",
                "  scores: "
                + ", ".join(f"{c['entry']} {_score(c.get('selection_metric'))}" for c in pick["candidates"]),
            ]
            if pick
            else []
        ),
        f"pseudo groups: {e['n_groups']} (k per scope {e['k_chosen']}), sizes {e['pseudo_group_sizes']}",
        f"agreement with true val groups: ARI {e['ari']:.3f}, NMI {e['nmi']:.3f}, "
        f"worst-group recovery {e['worst_recovery']:.2f}",
        "",
        f"{'true group':<16}" + "".join(f"{n:>13}" for n, _ in (("ERM", 0), ("ExMap", 0), ("oracle", 0))),
    ]
    for g in results["erm"]["test"]["per_group"]:
        vals = [r["test"]["per_group"][g] for _, r in rows]
        lines.append(f"{g:<16}" + "".join(f"{v:>13.3f}" if v is not None else f"{'-':>13}" for v in vals))
    lines.append(
        "\nmean acc = accuracy over all test samples; train-weighted = per-group test accuracy "
        "weighted by train group shares"
    )
    return "\n".join(lines)
