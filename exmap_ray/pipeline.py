"""The ExMap stage graph over the content-addressed stage cache.

    from exmap_ray.pipeline import run_pipeline
    results = run_pipeline(spec, out=Path("runs/demo"))     # needs ray.init() first

dataset -> erm -> features ---------------------------> dfr (pseudo groups) -> evaluate
                \-> heatmaps -> clusters (pseudo groups) -/   dfr (true groups: oracle row)

Stages are cached under `cache_dir` (default OUT/cache) by a hash of their
config and upstream keys, so re-running a spec (or a sweep trial sharing the
upstream) reuses ERM and heatmaps. Everything is logged to one MLflow run.
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from . import plots, tracking
from .clustering import check_heatmaps
from .data import GroupData, build_dataset
from .data.base import loader_options
from .data.layout import check_before_run
from .heatmaps.extract import HeatmapStore, extract_with_actors
from .metrics import agreement, evaluate
from .errors import DataError, SpecError, UserError
from .heatmaps import HEATMAP_METHODS
from .models import create_model, embed, find_weights, load_checkpoint
from .groups import GroupContext, infer_groups
from .retrain import RETRAINERS, fit_dfr
from .retrain.dfr import MIN_GROUP_SIZE as DFR_MIN_GROUP_SIZE
from .spec import Spec, stage_seed
from .resources import resolve_resources, run_task
from .storage import Loc
from .store import StageCache, load_npy, save_npy, save_npz, write_json

log = logging.getLogger(__name__)
# keys that change how a stage runs but not what it computes: kept out of the cache hash
EXECUTION_ONLY = {"heatmaps": {"batch_size", "shard_size", "num_actors"},
                  "dataset": {"loader_workers", "pin_memory", "persistent_workers", "decode_cache"}}


def _config(spec: Spec, section: str) -> dict:
    d = getattr(spec, section).__dict__
    return {k: v for k, v in d.items() if k not in EXECUTION_ONLY.get(section, ())}


RETRAIN_NAMES = {"dfr": "DFR", "groupdro": "GroupDRO", "jtt": "JTT"}  # for tables and plots


def retrain_label(method: str, mode: str = "last_layer") -> str:
    name = RETRAIN_NAMES.get(method, method)
    return f"{name} (end to end)" if mode == "end_to_end" else name


class Timer:
    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        log.info("── stage %s ──", name)
        t0 = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - t0, 3)
        log.info("stage %s finished in %.1f s", name, self.seconds[name])


def _device(spec: Spec) -> str:
    """Part of every compute stage's key: resources.gpu as resolved for this run (never 'auto')."""
    if spec.resources.gpu == "auto":
        raise RuntimeError("resources.gpu must be resolved (resources.resolve_resources) before stage keys")
    return "cuda" if spec.resources.gpu else "cpu"


def features_task(spec_dict: dict, model_uri: str, out_uri: str) -> dict:
    """Penultimate features and logits of val and test, written under `out_uri` (a Ray task)."""
    from .spec import from_dict

    spec = from_dict(spec_dict)
    data = build_dataset(spec.dataset, spec.seed)
    out = Loc.parse(out_uri)
    model = load_checkpoint(spec.model.backbone, data.n_classes, Loc.parse(model_uri))
    for split in ("val", "test"):
        f, logits = embed(model, data.split(split).images, device=_device(spec),
                          loader_kwargs=loader_options(spec.dataset, persistent=False))
        save_npy(out / f"{split}_features.npy", f)
        save_npy(out / f"{split}_logits.npy", logits)
    return {"dim": int(f.shape[1])}


def clusters_task(spec_dict: dict, hm_uri: str, feats_uri: str, out_uri: str, y_val: np.ndarray,
                  true_groups: np.ndarray) -> dict:
    """The val grouping retraining uses (ExMap's heatmap clusters, or a baseline), as a Ray task."""
    from .spec import from_dict

    spec = from_dict(spec_dict)
    hm, feats = Loc.parse(hm_uri), Loc.parse(feats_uri)
    from .clustering_scale import SCALE_MIN_N

    H = HeatmapStore(hm).for_clustering(whole_below=SCALE_MIN_N)  # millions: shards, memory-mapped
    if spec.groups.source == "exmap" and spec.clustering.input == "heatmaps":
        try:
            check_heatmaps(H)
        except DataError as e:  # name the culprit stage: which method, which files
            raise DataError(f"{e} [heatmaps.method '{spec.heatmaps.method}', backbone "
                            f"'{spec.model.backbone}', heatmaps in '{hm}']") from None
    ctx = GroupContext(y_val=y_val, clustering=spec.clustering, seed=stage_seed(spec.seed, "clusters"),
                       val_features=load_npy(feats / "val_features.npy"),
                       val_logits=load_npy(feats / "val_logits.npy"), heatmaps=H,
                       true_groups=true_groups, random_k=spec.groups.random_k)
    groups, info = infer_groups(spec.groups.source, ctx)  # only the `true` source sees true groups
    save_npy(Loc.parse(out_uri) / "pseudo_groups.npy", groups)
    return info


def run_stages(spec: Spec, data: GroupData, cache: StageCache, timer: Timer, upto: str | None = None) -> dict | None:
    """ERM -> features -> heatmaps -> clusters. Returns the stage objects and loaded arrays.

    `upto="erm"` or `"heatmaps"` stops after that stage (a sweep precomputes its shared upstream).
    Every stage reads and writes under the cache's storage root; the features and clustering
    stages run as Ray tasks, the heatmaps on an actor pool, ERM on Ray Train, so none of them
    depends on the driver's disk.
    """
    from .erm import train_erm

    spec = resolve_resources(spec)  # a no-op when run_pipeline or a sweep resolved it already
    device = _device(spec)
    erm = cache.stage("erm", {"seed": spec.seed, "dataset": _config(spec, "dataset"),
                              "model": _config(spec, "model"), "erm": _config(spec, "erm"), "device": device})
    with timer("erm"):
        erm_info = cache.run(erm, lambda d: train_erm(spec, d, data.n_classes))
    model_loc = erm.dir / "model.pt"
    if upto == "erm":
        return None

    feats = cache.stage("features", {"device": device}, (erm,))
    with timer("features"):
        cache.run(feats, lambda d: run_task(spec, features_task, spec.to_dict(), str(model_loc), str(d)))

    hm = cache.stage("heatmaps", {**_config(spec, "heatmaps"), "device": device}, (erm,))
    with timer("heatmaps"):
        hm_info = cache.run(hm, lambda d: extract_with_actors(spec, model_loc, len(data.val), d))
    if upto == "heatmaps":
        return None

    cl = cache.stage("clusters", {"clustering": _config(spec, "clustering"), "groups": _config(spec, "groups"),
                                  "seed": spec.seed, "device": device}, (hm, feats))
    with timer("clusters"):
        cl_info = cache.run(cl, lambda d: run_task(spec, clusters_task, spec.to_dict(), str(hm.dir), str(feats.dir),
                                                   str(d), data.val.y, data.val.group))

    stages = {"erm": erm, "features": feats, "heatmaps": hm, "clusters": cl}
    e2e_info = None
    if spec.retrain.mode == "end_to_end":  # fine-tune the whole network: a cached stage of its own
        stages["end_to_end"], e2e_info = end_to_end_stage(spec, data, cache, timer, erm, cl)

    load = lambda name: load_npy(feats.dir / name)  # noqa: E731
    return {"stages": stages, "end_to_end_info": e2e_info,
            "erm_info": erm_info, "heatmap_info": hm_info, "cluster_info": cl_info,
            "val_features": load("val_features.npy"), "test_features": load("test_features.npy"),
            "test_logits": load("test_logits.npy"), "val_logits": load("val_logits.npy"),
            "pseudo": load_npy(cl.dir / "pseudo_groups.npy")}


def end_to_end_stage(spec: Spec, data: GroupData, cache: StageCache, timer: Timer, erm, cl):
    """Fine-tune the ERM network with the groups of clusters stage `cl` (retrain.mode end_to_end).

    Cached by the retrain config, so a resumed run or a bench row never fine-tunes twice.
    """
    ft = cache.stage("end_to_end", {"retrain": _config(spec, "retrain"), "seed": spec.seed}, (erm, cl))
    with timer("end_to_end"):
        def compute(d: Path):
            from .retrain.end_to_end import run_end_to_end

            model = load_checkpoint(spec.model.backbone, data.n_classes, erm.dir / "model.pt")
            return run_end_to_end(spec, model, data.val.images, data.val.y, load_npy(cl.dir / "pseudo_groups.npy"),
                                  data.test.images, stage_seed(spec.seed, "dfr"), d)
        info = cache.run(ft, compute)
    return ft, info


def preflight(spec: Spec) -> GroupData:
    """Everything checkable before Ray work starts: the data, the backbone, the method names.

    Building the heatmap method on an untrained model makes LRP refuse an unsupported
    architecture now rather than inside an actor after ERM.
    """
    if spec.model.pretrained is not None:  # missing weights fail at once, not after the data checks
        find_weights(spec.model.pretrained, spec.model.backbone)
    check_before_run(spec.dataset)  # on disk: as `exmap-ray datasets check` (layout, every unreadable image)
    data = build_dataset(spec.dataset, spec.seed)
    model = create_model(spec.model.backbone, data.n_classes, spec.model.pretrained)
    HEATMAP_METHODS.get(spec.heatmaps.method)(model, spec.heatmaps)
    k = spec.clustering.k
    if k != "auto":
        counts = np.bincount(data.val.y)
        c = int(np.argmin(np.where(counts > 0, counts, len(data.val) + 1)))
        smallest, where = ((int(counts[c]), f"local scope (class {c})") if spec.clustering.scope == "local"
                           else (len(data.val), "global scope"))
        if k > smallest:
            raise SpecError(f"spec key 'clustering.k': {k} clusters but the {where} has only {smallest} val "
                            f"points; use an integer in 2..{smallest}, or 'auto'")
    sizes = np.bincount(data.val.group, minlength=data.n_groups)
    tiny = [g for g in range(len(sizes)) if 0 < sizes[g] < DFR_MIN_GROUP_SIZE]
    if tiny:
        raise DataError(f"dataset '{spec.dataset.name}': true group '{data.group_names[tiny[0]]}' has "
                        f"{sizes[tiny[0]]} val member(s); the oracle DFR row needs at least {DFR_MIN_GROUP_SIZE} "
                        f"per group. Enlarge the val split (dataset.n_val for cmnist) or weaken the shortcut")
    return data


def run_pipeline(spec: Spec, out, cache_dir=None, tracking_uri: str | None = None,
                 data: GroupData | None = None, parent_run_id: str | None = None, run_name: str | None = None) -> dict:
    """The whole pipeline once. `out` and `cache_dir` are local paths or storage URIs (storage.Loc)."""
    import mlflow

    out = Loc.parse(out)
    out.mkdir()
    timer = Timer()
    with timer("dataset"):
        data = data or preflight(spec)
    log.info("dataset %s: train %d, val %d, test %d, %d classes, %d true groups (evaluation only)",
             spec.dataset.name, len(data.train), len(data.val), len(data.test), data.n_classes, data.n_groups)
    spec = resolve_resources(spec)  # once, before any stage: part of every stage key
    uri = tracking_uri or spec.tracking.uri or tracking.default_uri(out)
    experiment = spec.tracking.experiment or spec.name
    lost = None
    try:
        exp_id = tracking.setup(uri, experiment, out)
    except UserError as e:
        if parent_run_id is None:  # a run on its own: the CLI probed the server, so this is a real fault
            raise
        exp_id, lost = None, e  # a sweep's trial: the server went away after the sweep started; go on
    cache = StageCache(cache_dir or out / "cache")

    tags = {"mlflow.parentRunId": parent_run_id} if parent_run_id else None  # nests a sweep's trials
    # every MLflow call goes through `tracker`: a server lost mid-run stops the logging, not the run
    tracker = tracking.Tracker(uri, out, experiment)
    if lost is not None:
        tracker.mark_lost("setup", lost)
    with tracker.run(experiment_id=exp_id, run_name=run_name or spec.name, tags=tags):
        tracker.call("log_params", tracking.log_flat_params, spec.flat())
        write_json(out / "spec.resolved.json", spec.to_dict())
        s = run_stages(spec, data, cache, timer)
        for h in (s["erm_info"].get("history") or []):
            tracker.call("log_metrics", tracking.log_metrics, h, "erm.", step=h["epoch"])
        results, heldout = evaluate_all(spec, data, s, timer)
        results.update(timings_s=timer.seconds, config=spec.to_dict(), mlflow_run_id=tracker.run_id,
                       cache={k: {"key": v.key, "dir": str(v.dir)} for k, v in s["stages"].items()})
        tracker.call("log_metrics", tracking.log_metrics, {k: results[k] for k in ("erm", "exmap", "oracle_dfr")})
        tracker.call("log_metrics", tracking.log_metrics, {"timings_s": timer.seconds})
        save_npz(out / "selection.npz", **heldout, pseudo_groups=s["pseudo"], y=data.val.y)
        results["exmap"]["selection_file"] = str(out / "selection.npz")
        write_json(out / "results.json", results)
        make_figures(data, s, results, out, spec)
        for name in tracking.ARTIFACTS:
            tracker.call("log_artifact", tracking.log_artifact, out / name)
    return results


def evaluate_all(spec: Spec, data: GroupData, s: dict, timer: Timer) -> tuple[dict, dict]:
    """Test metrics of ERM, ExMap and oracle DFR; plus ExMap's held-out val predictions (for sweeps)."""
    train_g, names = data.train.group, data.group_names
    test = data.test
    res = {"erm": {"test": evaluate(s["test_logits"].argmax(1), test.y, test.group, names, train_g),
                   "val_acc": float((s["val_logits"].argmax(1) == data.val.y).mean())}}
    with timer("dfr"):
        if spec.retrain.mode == "end_to_end":  # already fine-tuned in its stage: read its predictions
            from .retrain.end_to_end import EndToEndModel

            exmap = EndToEndModel(s["stages"]["end_to_end"].dir, s["end_to_end_info"], data.val.y, s["pseudo"],
                                  score_groups={"true": data.val.group})
        else:
            exmap = RETRAINERS.get(spec.retrain.method).fit(
                s["val_features"], data.val.y, s["pseudo"], spec, stage_seed(spec.seed, "dfr"),
                score_groups={"true": data.val.group})  # scored for analysis, never used to choose
        oracle = fit_dfr(s["val_features"], data.val.y, data.val.group, spec.dfr, stage_seed(spec.seed, "dfr"))
    agree = agreement(s["pseudo"], data.val.group, names)
    res["exmap"] = {"test": evaluate(exmap.predict(s["test_features"]), test.y, test.group, names, train_g),
                    "n_groups": int(s["cluster_info"]["n_groups"]), **agree,
                    "pseudo_group_sizes": s["cluster_info"]["sizes"],
                    "k_chosen": {sc: v["k"] for sc, v in s["cluster_info"].get("scopes", {}).items()},
                    "groups_source": spec.groups.source, "retrain": spec.retrain.method,
                    "retrain_mode": spec.retrain.mode,
                    "dfr_C": exmap.chosen.get("C"), "retrain_chosen": exmap.chosen,
                    # label-free: worst pseudo-group / worst-class accuracy on held-out halves of val
                    "val": {"worst_pseudo_group_acc": exmap.heldout["pseudo"],
                            "worst_class_acc": exmap.heldout["class"],
                            "oracle_worst_group_acc": exmap.heldout["true"]}}
    if spec.retrain.mode == "end_to_end":
        res["exmap"]["end_to_end"] = exmap.info  # steps, final loss, GroupDRO's final q, device
    res["oracle_dfr"] = {"test": evaluate(oracle.predict(s["test_features"]), test.y, test.group, names, train_g),
                         "dfr_C": oracle.C}
    if data.shortcut_metrics is not None:  # datasets with several shortcuts: per-shortcut gaps (UrbanCars)
        preds = {"erm": s["test_logits"].argmax(1), "exmap": exmap.predict(s["test_features"]),
                 "oracle_dfr": oracle.predict(s["test_features"])}
        for row, pred in preds.items():
            res[row]["test"]["shortcut_gaps"] = data.shortcut_metrics(pred, test.y, test.attrs)
    return res, {"heldout_idx": exmap.heldout_idx, "heldout_pred": exmap.heldout_pred}


def make_figures(data: GroupData, s: dict, results: dict, out: Path, spec: Spec) -> None:
    label = "ExMap" if spec.groups.source == "exmap" else f"{spec.groups.source} groups"
    rows = {"ERM": results["erm"]["test"]["per_group"],
            f"{label} + {retrain_label(spec.retrain.method, spec.retrain.mode)}": results["exmap"]["test"]["per_group"],
            "oracle DFR": results["oracle_dfr"]["test"]["per_group"]}
    plots.group_accuracy_bars(rows, out / "group_accuracy.png", f"{spec.name}: per-group test accuracy")
    pseudo = s["pseudo"]
    H = HeatmapStore(s["stages"]["heatmaps"].dir)  # read per heatmap shown (remote: via the node-local cache)
    pairs = s["cluster_info"].get("group_class_cluster")
    captions = []
    for g in range(int(pseudo.max()) + 1):
        true = data.val.group[pseudo == g]
        if not len(true):
            captions.append(f"pseudo group {g}: empty")
            continue
        top = np.bincount(true, minlength=data.n_groups).argmax()
        where = f"class {pairs[g][0]}, cluster {pairs[g][1]}" if pairs else f"class {data.val.y[pseudo == g][0]}"
        captions.append(f"pseudo group {g}: {where}, n={len(true)}; "
                        f"mostly '{data.group_names[top]}' ({(true == top).mean():.0%})")
    plots.heatmap_grid(data.val.images, H, pseudo, captions, out / "heatmaps_by_pseudo_group.png",
                       seed=stage_seed(spec.seed, "plot"))


def format_table(results: dict) -> str:
    e = results["exmap"]
    label = ("ExMap" if e.get("groups_source", "exmap") == "exmap" else e["groups_source"]) + \
        f" + {retrain_label(e.get('retrain', 'dfr'), e.get('retrain_mode', 'last_layer'))}"
    rows = [("ERM", results["erm"]), (label, results["exmap"]),
            ("oracle DFR (true val groups)", results["oracle_dfr"])]
    lines = [f"{'method':<30} {'test WGA':>9} {'mean acc':>9} {'train-weighted':>15}", "-" * 66]
    for name, r in rows:
        t = r["test"]
        lines.append(f"{name:<30} {t['worst_group_acc']:>9.3f} {t['mean_acc']:>9.3f} {t['mean_acc_train_weighted']:>15.3f}")
    e = results["exmap"]
    lines += ["", f"pseudo groups: {e['n_groups']} (k per scope {e['k_chosen']}), sizes {e['pseudo_group_sizes']}",
              f"agreement with true val groups: ARI {e['ari']:.3f}, NMI {e['nmi']:.3f}, "
              f"worst-group recovery {e['worst_recovery']:.2f}", "",
              f"{'true group':<16}" + "".join(f"{n:>13}" for n, _ in (('ERM', 0), ('ExMap', 0), ('oracle', 0)))]
    for g in results["erm"]["test"]["per_group"]:
        vals = [r["test"]["per_group"][g] for _, r in rows]
        lines.append(f"{g:<16}" + "".join(f"{v:>13.3f}" if v is not None else f"{'-':>13}" for v in vals))
    lines.append("\nmean acc = accuracy over all test samples; train-weighted = per-group test accuracy "
                 "weighted by train group shares")
    return "\n".join(lines)
