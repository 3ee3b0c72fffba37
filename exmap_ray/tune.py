"""Ray Tune sweeps over the spec's search space: one MLflow parent run, one child run per trial.

    exmap-ray tune cmnist_sweep --out runs/sweep
    exmap-ray tune cmnist_sweep --out runs/sweep --resume   # after an interruption

- The upstream every trial shares (ERM; the heatmaps too unless a heatmaps key is
  searched) is computed once by the driver, before any trial starts. Trials
  compute only what they vary, through the same content-addressed cache, whose
  per-stage locks make concurrent trials wait for one another instead of
  computing the same stage twice.
- Trials are ranked by a label-free metric (`search.metric`, held-out halves of
  val, pseudo groups or classes only). Oracle metrics are logged beside it and
  never used to choose: the summary names both the label-free choice and the
  choice an oracle with true val groups would make, with both test WGAs.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import os
import re
import tempfile
import functools
from pathlib import Path


from . import console, fence, plots, quiet_worker_logs, tracking
from .console import Progress
from .errors import UserError
from .faults import inject
from .pipeline import preflight, run_pipeline, start_job
from .search import Domain, n_trials, parse_space, unflatten
from .selection import (  # noqa: F401 - tune.choose, tune.score_trials
    POOLED_METRIC,
    SWEEP_METRIC,
    SWEEP_METRICS,
    _best,
    choose,
    score_trials,
)
from .spec import Spec, _deep_merge, from_dict, stable_hash, stage_seed
from .resources import resolve_resources
from .stages import changes, run_stages, shared_stages
from .storage import Loc
from .legacy import upgrade_results
from .storage import load_npz, read_json, write_json

log = logging.getLogger(__name__)
ORACLE_METRIC = "oracle_val_worst_group_acc"
ATTEMPT_TAG = "exmap_ray.sweep_attempt"  # on a trial's MLflow run: which driver process started the trial
COLUMNS = [
    "trial",
    "status",
    "selection_metric",
    "selection_se",
    SWEEP_METRIC,
    POOLED_METRIC,
    "val_worst_pseudo_group_acc",
    "val_worst_class_acc",
    ORACLE_METRIC,
    "test_worst_group_acc",
    "test_mean_acc",
    "n_groups",
    "ari",
    "worst_recovery",
    "k_chosen",
]


def trial_metrics(res: dict, metric: str) -> dict:
    e = res["robust"]
    m = {
        "val_worst_pseudo_group_acc": e["val"]["worst_pseudo_group_acc"],
        "val_worst_class_acc": e["val"]["worst_class_acc"],
        ORACLE_METRIC: e["val"]["oracle_worst_group_acc"],
        "test_worst_group_acc": e["test"]["worst_group_acc"],
        "test_mean_acc": e["test"]["mean_acc"],
        "erm_test_worst_group_acc": res["erm"]["test"]["worst_group_acc"],
        "oracle_dfr_test_worst_group_acc": res["oracle_dfr"]["test"]["worst_group_acc"],
        "n_groups": e["n_groups"],
        "ari": e["ari"],
        "worst_recovery": e["worst_recovery"],
        "k_chosen": "/".join(str(k) for k in e["k_chosen"].values()),
        "selection_file": e["selection_file"],
    }
    # in flight (for Tune's search algorithms) the sweep metric is proxied by the trial's own groups
    m["selection_metric"] = m["val_worst_pseudo_group_acc" if metric in SWEEP_METRICS else metric]
    return m


def run_trial(
    config: dict,
    base: dict,
    root: str,
    cache_dir: str,
    uri: str,
    parent_run_id: str,
    domains: tuple[Domain, ...] = (),
    attempt: str = "",
) -> None:
    """One Tune trial: the base spec plus this trial's values, run through the pipeline.

    `root` and `cache_dir` are storage-root strings (local path or URI): the trial may run on any node.
    `attempt` names the driver process that started it (a new one per `--resume`), as an MLflow tag."""
    import torch
    from ray import tune

    torch.set_num_threads(1)  # trials share the machine with ERM workers and heatmap actors
    quiet_worker_logs()  # under --quiet: no INFO lines from the pipeline or Ray's per-trial checkpoint line
    overrides = unflatten({d.key: d.decode(config[d.tune_key]) for d in domains if d.tune_key in config})
    spec = from_dict(_deep_merge(base, overrides))
    name = tune.get_context().get_trial_name()
    fenced = functools.partial(fence.check, root, attempt)  # raises Fenced once a resume owns the folder
    fenced(f"the start of trial {name}")
    # Tune snapshots its own state only every few seconds, so after a crash it may rerun a trial that
    # had finished. A done record keyed by the resolved spec makes that rerun a cheap re-report.
    resolved = {k: v for k, v in spec.to_dict().items() if k != "search"}
    done = Loc.parse(root) / "trial_results" / f"{stable_hash(resolved)}.json"
    if done.exists():
        res = upgrade_results(read_json(done))  # a record from before a rename reads as today's
        log.info("trial %s: finished before as %s; reporting its results without rerunning", name, res["trial"])
    else:
        inject("trial", spec.flat())  # no-op unless an EXMAP_RAY_FAULTS plan is set (fault tests)
        # the driver built the base spec's model and heatmap method; a trial builds them again only when
        # it searches their keys (an untrained model just for that check costs a process seconds of imports)
        searched = {d.key.partition(".")[0] for d in domains}
        data = preflight(spec, check_model=bool(searched & {"model", "heatmaps"}))
        res = run_pipeline(
            spec,
            Loc.parse(root) / "trials" / name,
            Loc.parse(cache_dir),
            uri,
            data=data,
            parent_run_id=parent_run_id,
            run_name=name,
            run_tags={ATTEMPT_TAG: attempt} if attempt else None,
            fence=fenced,
        )
        res["trial"] = name
        fenced(f"trial {name}'s done record")
        write_json(done, res)  # after the MLflow run has ended: the trial counts as done only now
    metrics = trial_metrics(res, spec.search.metric)
    metrics["trial_name"] = name  # the summary's and MLflow's name for this trial, whatever Tune's id scheme
    with tempfile.TemporaryDirectory() as d:
        write_json(Path(d) / "results.json", res)
        # a checkpoint makes Tune keep Result.metrics; it also carries the full results
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))


def _search_alg(spec: Spec):
    algo = spec.search.algorithm
    if algo == "basic":
        return None
    try:  # seeded from the spec: the same spec proposes the same trials
        if algo == "optuna":
            import optuna
            from ray.tune.search.optuna import OptunaSearch

            return OptunaSearch(
                metric="selection_metric",
                mode="max",
                sampler=optuna.samplers.TPESampler(seed=stage_seed(spec.seed, "search")),
            )
        from ray.tune.search.hyperopt import HyperOptSearch

        return HyperOptSearch(
            metric="selection_metric", mode="max", random_state_seed=stage_seed(spec.seed, "search") % 2**32
        )
    except (ImportError, AssertionError) as e:
        raise UserError(
            f"search.algorithm '{algo}' needs its package: pip install {algo} (or pip install 'exmap-ray[search]'); {e}"
        ) from None


def trial_printer(planned: int, domains):
    """A Tune callback (Tune runs it in the driver) that prints each ended trial and the best score so far.

    It counts the trials that had ended before it started (a resumed sweep) as done, and keeps no
    console state when Tune pickles it with the tuner (a restored sweep brings it back)."""
    from ray import tune

    class TrialPrinter(tune.Callback):
        def __init__(self):
            self.bar, self.done, self.best = None, 0, None

        def __getstate__(self):
            return {**self.__dict__, "bar": None}

        def _start(self, trials) -> None:
            ended = [t for t in trials if t.status in ("TERMINATED", "ERROR")]
            self.done = len(ended)
            for t in ended:
                self._score(t)
            self.bar = Progress("trials", max(planned, len(trials)), "trial", initial=self.done)

        def _score(self, trial):
            m = trial.last_result or {}
            score, name = m.get("selection_metric"), m.get("trial_name") or str(trial)
            if trial.status != "ERROR" and score is not None and (self.best is None or score > self.best[0]):
                self.best = (score, name)
            return score, name

        def on_step_begin(self, iteration, trials, **info):
            if self.bar is None:
                self._start(trials)

        def _ended(self, trial, what: str) -> None:
            if self.bar is None:
                self._start([])
            self.done += 1
            score, name = self._score(trial)
            cfg = ", ".join(f"{d.key}={d.decode(trial.config.get(d.tune_key))}" for d in domains)
            best = f"best so far {self.best[0]:.3f} ({self.best[1]})" if self.best else "no score yet"
            mine = f"selection metric {score:.3f}" if what == "done" and score is not None else what
            self.bar.step(1, f"trial {self.done}/{planned} {what}: {name} ({cfg}), {mine}; {best}", best)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._ended(trial, "done")

        def on_trial_error(self, iteration, trials, trial, **info):
            self._ended(trial, "failed")

        def on_experiment_end(self, trials, **info):
            if self.bar is not None:
                self.bar.close()

    return TrialPrinter()


def run_sweep(spec: Spec, out, cache_dir=None, tracking_uri: str | None = None, resume: bool = False) -> dict:
    """`out`, `cache_dir`: local paths or storage URIs. Tune's own tables reach the console only under
    `-v` (console.py); its place, a line per ended trial."""
    import mlflow
    from ray import tune

    out = Loc.parse(out)
    domains = parse_space(spec)
    data = preflight(spec)
    spec = resolve_resources(spec)  # once for the whole sweep: every trial gets the same devices
    check_trial_gpus(spec, [d.key for d in domains])
    state_path = out / "sweep.json"
    if resume and not state_path.exists():
        raise UserError(f"--resume: no sweep to resume in '{out}' (no sweep.json); drop --resume to start one")
    if not resume and state_path.exists():
        raise UserError(f"'{out}' already holds a sweep; add --resume to continue it, or pick another --out")
    if resume:
        _check_searched_keys(out, domains)
    job = start_job(spec, out, cache_dir, tracking_uri)
    uri, tracker, timer = job.uri, job.tracker, job.timer
    storage = Loc.parse(spec.search.storage_path or out / "tune")  # Tune's own state, under the root too
    planned = n_trials(domains, spec.search.num_samples)

    state = read_json(state_path) if resume else {}
    # every parent-run MLflow call goes through `tracker`: a server lost mid-sweep stops the logging, not the
    # sweep (trials have their own trackers); `exmap-ray sync-mlflow OUT` uploads the parent and the trials later
    with tracker.run(
        experiment_id=job.exp_id, run_id=state.get("parent_run_id"), run_name=None if resume else f"{spec.name} sweep"
    ):
        parent_id = tracker.run_id or state.get("parent_run_id")
        write_json(out / "spec.resolved.json", spec.to_dict())
        # one id per driver process, holding the folder's fence token (fence.py): the trials it starts tag
        # their MLflow runs with it, and a trial of an earlier driver stops before it writes anything that counts
        attempt, before = fence.claim(out, fence.current_ray_job())
        if resume:
            # the interrupted driver's trial actors can outlive it by seconds: on the same Ray, wait for them
            # to end before marking their runs and starting trials; any that outlast the wait are fenced off
            fence.wait_for_job(before.get("ray_job"))
            tracker.call("search_runs", _mark_killed_children, parent_id)
        else:
            tracker.call(
                "log_params", tracking.log_flat_params, {k: v for k, v in spec.flat().items() if k != "search.space"}
            )
            tracker.call("log_dict", mlflow.log_dict, spec.search.space, "search_space.json")
            write_json(state_path, {"parent_run_id": parent_id, "storage": str(storage), "planned": planned})
        # the upstream all trials share (stages no searched key changes) is computed here, once, before
        # any trial holds resources
        shared = shared_stages(spec, [d.key for d in domains])
        if shared:
            log.info("sweep: computing the shared upstream (%s) once, before the trials", ", ".join(shared))
            run_stages(spec, data, job.cache, timer, targets=shared)
        log.info(
            "sweep: %d trial(s) over %s, at most %d at once, selected by %s",
            planned,
            ", ".join(d.key for d in domains),
            spec.search.max_concurrent_trials,
            spec.search.metric,
        )
        base = spec.to_dict()
        trainable = tune.with_resources(
            tune.with_parameters(
                run_trial,
                base=base,
                root=str(out),
                cache_dir=str(job.cache.root),
                uri=uri,
                parent_run_id=parent_id,
                domains=tuple(domains),
                attempt=attempt,
            ),
            {"cpu": spec.search.trial_cpus, "gpu": spec.search.trial_gpus},
        )
        experiment = storage / "sweep"
        if resume and tune.Tuner.can_restore(experiment.fs_path, storage_filesystem=storage.fs):
            tuner = tune.Tuner.restore(
                experiment.fs_path, trainable=trainable, resume_errored=True, storage_filesystem=storage.fs
            )
        else:
            tuner = tune.Tuner(
                trainable,
                param_space={d.tune_key: d.tune() for d in domains},
                tune_config=tune.TuneConfig(
                    metric="selection_metric",
                    mode="max",
                    num_samples=spec.search.num_samples,
                    max_concurrent_trials=spec.search.max_concurrent_trials,
                    search_alg=_search_alg(spec),
                    # a finished trial's process runs the next trial: torch, MLflow's
                    # store and the data are set up once per process, not per trial
                    reuse_actors=True,
                ),
                run_config=tune.RunConfig(
                    name="sweep",
                    storage_path=storage.fs_path,
                    storage_filesystem=storage.fs,
                    failure_config=tune.FailureConfig(max_failures=spec.search.max_failures),
                    callbacks=[trial_printer(planned, domains)],
                ),
            )
        # Tune prints its tables and experiment box to stdout whatever `verbose` says (and a restored sweep
        # keeps its first run's verbosity): off unless -v; warnings and errors go to stderr and still show
        with (
            timer("trials"),
            open(os.devnull, "w") as devnull,
            contextlib.nullcontext() if console.verbose() else contextlib.redirect_stdout(devnull),
        ):
            grid = tuner.fit()
        if resume:
            # a trial process of the interrupted sweep can outlive its driver by seconds and start its MLflow
            # run after the KILLED marking above; every trial of this attempt has ended now, so a child
            # run still RUNNING from another attempt is one of those
            tracker.call("search_runs", _mark_killed_children, parent_id, attempt)
        rows = collect_rows(grid, domains)
        summary = summarize(rows, domains, spec, out)
        summary.update(
            timings_s=timer.seconds,
            mlflow_parent_run_id=parent_id,
            planned_trials=planned,
            cache_records=len(job.cache.records()),
        )
        summary["mlflow_pending"] = pending_folders(out)
        write_json(out / "summary.json", summary)
        log_sweep_summary(tracker, out, summary)
    if tracker.pending:  # MLflow went away while the summary was being logged: list the parent too
        summary["mlflow_pending"] = pending_folders(out)
        write_json(out / "summary.json", summary)
    return summary


def check_trial_gpus(spec: Spec, searched: list[str]) -> None:
    """search.trial_gpus > 0 only where every trial can finish: on a GPU run, and with ERM shared.

    A trial holding a GPU share runs its GPU stages (clusters, heatmaps, end-to-end) on that share, in
    its own process. ERM cannot: Ray Train's workers need GPUs of their own, and with trials holding
    every GPU (one GPU and trial_gpus > 0, or N trials x 1 GPU on a fixed cluster) they would wait for
    ever. So a sweep that searches keys ERM depends on keeps trial_gpus at 0 (its trials then hand their
    GPU stages to Ray tasks and actors, which take GPUs no trial holds)."""
    from .errors import SpecError

    share = spec.search.trial_gpus
    if share <= 0:
        return
    if spec.resources.gpu is not True:
        raise SpecError(
            f"spec key 'search.trial_gpus': {share:g}, but resources.gpu resolved to false (the "
            f"cluster has no GPU): trials would wait for ever for GPUs. Use search.trial_gpus: "
            f"0, or give the run GPUs (resources.gpu true, or auto with "
            f"resources.autoscale_wait_s)"
        )
    if "erm" not in shared_stages(spec, searched):
        erm_keys = [k for k in searched if changes("erm", k)]
        raise SpecError(
            f"spec key 'search.trial_gpus': {share:g} with searched keys that change ERM "
            f"({', '.join(erm_keys)}): each trial would train ERM on Ray Train workers that need "
            f"GPUs of their own while the trials hold theirs, which can wait for ever. Use "
            f"search.trial_gpus: 0 for this sweep (its trials then ask Ray for each GPU "
            f"stage's GPU)"
        )


def pending_folders(out) -> list[str]:
    """The sweep folder and trial folders whose MLflow logging failed (they hold a marker file)."""
    out = Loc.parse(out)
    markers = [out / tracking.PENDING, *(out / "trials").glob(f"*/{tracking.PENDING}")]
    return sorted(str(p.parent) for p in markers if p.is_file())


def log_sweep_summary(tracker, out, summary: dict) -> None:
    out = Loc.parse(out)
    for name in tracking.SUMMARY_ARTIFACTS:
        if (out / name).exists():
            tracker.call("log_artifact", tracking.log_artifact, out / name)
    tracker.call("log_metrics", tracking.log_metrics, tracking.sweep_metrics(summary))


def _mark_killed_children(parent_id: str, keep_attempt: str | None = None) -> None:
    """Child runs still RUNNING belong to trials the interruption killed; say so in MLflow. Runs tagged
    with `keep_attempt` (this driver's trials) are left alone."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    exp = client.get_run(parent_id).info.experiment_id
    for run in client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent_id}' and attributes.status = 'RUNNING'"):
        if keep_attempt is not None and run.data.tags.get(ATTEMPT_TAG) == keep_attempt:
            continue
        client.set_terminated(run.info.run_id, status="KILLED")
        log.info("sweep: marked interrupted trial run %s (%s) as KILLED", run.info.run_name, run.info.run_id)


def collect_rows(grid, domains) -> list[dict]:
    rows = []
    for r in grid:
        # each trial reports its name (the MLflow run name). Sweeps from before that are named from Tune's
        # trial folder, "<trial name>_<index>_<params>_<time>" (trial id: 5 hex digits, then a 5-digit index)
        m = re.match(r"(.+?_[0-9a-f]{5}_\d{5})_\d+_", Path(r.path).name) if r.path else None
        name = (r.metrics or {}).get("trial_name") or (m.group(1) if m else Path(str(r.path)).name)
        cfg = {d.key: d.decode(r.config.get(d.tune_key)) for d in domains}
        row = {"trial": name, **{f"config.{k}": v for k, v in cfg.items()}}
        if r.error:
            row.update(status="ERROR", error=f"{type(r.error).__name__}: {str(r.error).splitlines()[-1][:300]}")
        else:
            row.update(
                status="OK",
                selection_file=r.metrics.get("selection_file"),
                **{k: r.metrics.get(k) for k in COLUMNS if k not in ("trial", "status")},
            )
        rows.append(row)
    return sorted(rows, key=lambda x: x["trial"])


def add_sweep_metric(rows: list[dict], metric: str, se: str = "binomial", min_members: int = 3) -> None:
    """Score each trial's held-out predictions on every trial's pseudo groups (same val and halves only),
    and the standard error of each trial's selection metric (`se`: binomial or halves); groups with fewer
    than `min_members` val members are left out (search.min_members)."""
    ok = [
        r for r in rows if r["status"] == "OK" and r.get("selection_file") and Loc.parse(r["selection_file"]).exists()
    ]  # a path or a URI under the storage root
    score_trials(ok, {r["trial"]: load_npz(r["selection_file"]) for r in ok}, metric, se, min_members)


def summarize(rows: list[dict], domains, spec: Spec, out: Path) -> dict:
    add_sweep_metric(rows, spec.search.metric, spec.search.se, spec.search.min_members)
    chosen, oracle = choose(rows, spec.search.select), _best(rows, ORACLE_METRIC)
    top = _best(rows, "selection_metric")  # the plain maximum, reported beside the rule's choice
    cols = ["trial"] + [f"config.{d.key}" for d in domains] + COLUMNS[1:] + ["error"]
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    (out / "summary.csv").write_text(buf.getvalue())

    def fmt(v):
        return f"{v:.3f}" if isinstance(v, float) else ("" if v is None else str(v))

    rule = (
        f"the fewest pseudo groups within one standard error (`search.se: {spec.search.se}`) of the best score"
        if spec.search.select == "one_se"
        else "the best score"
    )
    md = [
        f"# Sweep summary: {spec.name}",
        "",
        f"Selection metric (label-free): `{spec.search.metric}`, choosing {rule} (`search.select: "
        f"{spec.search.select}`). Oracle column: worst *true*-group accuracy on the same held-out val halves, "
        f"shown for analysis only.",
        "",
    ]
    for title, row in (
        ("Label-free choice", chosen),
        ("Highest label-free score", top if top is not chosen else None),
        ("Oracle choice (true val groups)", oracle),
    ):
        if row:
            md.append(
                f"- **{title}**: `{row['trial']}` "
                + ", ".join(f"{d.key}={row.get('config.' + d.key)}" for d in domains)
                + f" -> test WGA **{row['test_worst_group_acc']:.3f}**, test mean acc {row['test_mean_acc']:.3f}"
            )
    md += ["", "| " + " | ".join(c.removeprefix("config.") for c in cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    (out / "summary.md").write_text("\n".join(md) + "\n")  # out: a storage Loc

    ok = [r for r in rows if r["status"] == "OK"]
    if ok:
        plots.scatter_selection(ok, spec.search.metric, out / "wga_vs_selection_metric.png")
        if any(d.key == "clustering.k" for d in domains):
            plots.wga_vs_k(ok, out / "wga_vs_k.png")
    failed = [r for r in rows if r["status"] != "OK"]
    return {
        "label_free_choice": chosen,
        "label_free_top": top,
        "select": spec.search.select,
        "se": spec.search.se,
        "oracle_choice": oracle,
        "n_trials": len(rows),
        "n_failed": len(failed),
        "failed": failed,
        "rows": rows,
        "gap_to_oracle": (oracle["test_worst_group_acc"] - chosen["test_worst_group_acc"])
        if chosen and oracle
        else None,
    }


def format_summary(summary: dict) -> str:
    lines = [f"{summary['n_trials']} trial(s), {summary['n_failed']} failed"]
    for title, key in (
        ("label-free choice", "label_free_choice"),
        ("highest score   ", "label_free_top"),
        ("oracle choice   ", "oracle_choice"),
    ):
        r = summary.get(key)
        if r and not (key == "label_free_top" and r is summary["label_free_choice"]):
            cfg = ", ".join(f"{k.removeprefix('config.')}={v}" for k, v in r.items() if k.startswith("config."))
            lines.append(
                f"{title}: {r['trial']} ({cfg}): selection metric {r['selection_metric']:.3f}, "
                f"test WGA {r['test_worst_group_acc']:.3f}, test mean acc {r['test_mean_acc']:.3f}"
            )
    for r in summary["failed"]:
        lines.append(f"FAILED {r['trial']}: {r.get('error')}")
    return "\n".join(lines)


def _check_searched_keys(out: Loc, domains: list[Domain]) -> None:
    """--resume: Tune restores its trials with the keys the sweep started with; a sweep started before
    keys moved (e.g. dfr.c_grid, now retrain.dfr.c_grid) would hand its trials keys nobody reads."""
    from .search import flatten_space
    from .spec import MOVED

    saved = out / "spec.resolved.json"
    if not saved.is_file():
        return
    old = flatten_space((read_json(saved).get("search") or {}).get("space") or {})
    moved = sorted(k for k in old if k in MOVED)
    if moved:
        raise UserError(
            f"--resume: the sweep in '{out}' searched {', '.join(moved)}, which moved "
            f"({'; '.join(f'{k} -> {MOVED[k]}' for k in moved)}); Tune would restore its trials "
            f"under the old names. Start it again under another --out with the same --cache: every "
            f"cached stage is reused"
        )
