"""Upload a finished run's output folder to MLflow after the tracking server was unreachable.

    exmap-ray sync-mlflow runs/demo                       # the URI the run used (OUT/tracking.json)
    exmap-ray sync-mlflow runs/demo --tracking-uri http://host:5000
    exmap-ray sync-mlflow runs/bench                      # a bench's folder (bench.json), or a sweep's

`run_pipeline` writes OUT/mlflow_pending.json when MLflow fails mid-run. This reads OUT
(spec.resolved.json, results.json, the ERM history in the cached ERM stage, the plots) and logs
what the run logs: the flattened spec as params, per-epoch ERM metrics, test metrics and stage
timings, and the artifacts. If the run the pipeline started exists on the server it is completed,
else a new run is made in the same experiment, tagged `exmap_ray.synced_from`. The run ends
FINISHED and the marker is removed. Params and metrics the server already has are not logged twice.
A sweep's folder (sweep.json) syncs its parent run and then each trial's; a bench's folder
(bench.json) syncs its one run: the spec and seeds as params, every row's mean and std, its files.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from . import tracking
from .errors import UserError
from .legacy import upgrade_results
from .spec import flatten
from .storage import Loc, redact
from .storage import write_json

log = logging.getLogger(__name__)


def _read(path: Path, what: str) -> dict:
    if not path.is_file():
        raise UserError(
            f"{path} is missing: '{path.parent}' is not the output folder of a finished `exmap-ray run` ({what})"
        )
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path} cannot be read ({type(e).__name__}: {e})") from None


def erm_history(out: Path, results: dict) -> list[dict]:
    """The per-epoch ERM metrics from the ERM stage folder named in results.json, or []."""
    erm = (results.get("cache") or {}).get("erm") or {}
    candidates = []
    if erm.get("dir"):
        candidates.append(Loc.parse(erm["dir"]))
    if erm.get("key"):
        candidates.append(out / "cache" / f"erm-{erm['key']}")
    for d in candidates:
        if (d / "history.json").is_file():
            return json.loads((d / "history.json").read_text())
    log.warning(
        "sync-mlflow: no ERM history.json found (looked in %s); per-epoch ERM metrics are not logged",
        ", ".join(map(str, candidates)) or "nowhere: results.json names no ERM stage",
    )
    return []


def sync(out: Path, tracking_uri: str | None = None, parent_run_id: str | None = None) -> dict:
    """Log OUT to MLflow; returns what was done. Raises UserError for a bad OUT or an unusable server.

    OUT is a run's folder, or a sweep's (it holds sweep.json): then the parent run and every trial
    folder with a marker are synced, trials nested under the parent.
    """
    out = Loc.parse(out)  # a local folder or a storage URI
    if (out / "sweep.json").is_file():
        return sync_sweep(out, tracking_uri)
    if (out / "bench.json").is_file():
        return sync_bench(out, tracking_uri)
    results = upgrade_results(_read(out / "results.json", "results.json is written when the pipeline finishes"))
    spec = _read(out / "spec.resolved.json", "spec.resolved.json is written when the pipeline starts")
    pending_path = out / tracking.PENDING
    if not pending_path.is_file():
        return {"status": "nothing pending", "out": str(out)}
    pending = _read(pending_path, "the marker of a run whose MLflow logging failed")
    uri, experiment = _target(out, pending, spec, tracking_uri)

    tracking.http_defaults()
    tracking.probe(uri, out)
    exp_id = tracking.setup(uri, experiment, out)
    try:
        return _log_all(out, results, spec, pending, uri, experiment, exp_id, parent_run_id)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - the server failed part-way: keep the marker, say so
        raise _failed_midway(uri, e, pending_path) from None


def _failed_midway(uri: str, e: Exception, pending_path) -> UserError:
    """The error when the server fails during a sync: the marker stays, so the sync can be run again."""
    return UserError(
        f"MLflow at '{uri}' failed during sync-mlflow ({type(e).__name__}: "
        f"{' '.join(str(e).split())[:300]}). {pending_path} is kept; run sync-mlflow again "
        f"when the server answers"
    )


def _target(out: Path, pending: dict, spec: dict, tracking_uri: str | None) -> tuple[str, str]:
    """(URI, experiment) to sync to: the flag, else what the marker or OUT/tracking.json recorded."""
    info = json.loads((out / tracking.INFO).read_text()) if (out / tracking.INFO).is_file() else {}
    uri = tracking_uri or pending.get("uri") or info.get("uri") or tracking.default_uri(out)
    experiment = (
        pending.get("experiment")
        or info.get("experiment")
        or (spec.get("tracking") or {}).get("experiment")
        or spec.get("name")
    )
    return uri, experiment


def _existing_run(client, run_id: str | None):
    from mlflow.exceptions import MlflowException

    if not run_id:
        return None
    try:
        run = client.get_run(run_id)
    except MlflowException as e:
        if getattr(e, "error_code", "") == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    return run if run.info.lifecycle_stage == "active" else None


def _log_all(
    out: Path,
    results: dict,
    spec: dict,
    pending: dict,
    uri: str,
    experiment: str,
    exp_id: str,
    parent_run_id: str | None = None,
) -> dict:
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    run_id = pending.get("run_id") or results.get("mlflow_run_id")
    existing = _existing_run(client, run_id)
    have_params = dict(existing.data.params) if existing else {}
    have_metrics = set(existing.data.metrics) if existing else set()

    if existing:
        active = mlflow.start_run(run_id=existing.info.run_id)
    else:
        tags = {"mlflow.parentRunId": parent_run_id} if parent_run_id else None  # a sweep's trial stays nested
        active = mlflow.start_run(
            experiment_id=exp_id, run_name=out.name if parent_run_id else spec.get("name"), tags=tags
        )
        if run_id:
            log.info("sync-mlflow: run %s is not on %s; logging to a new run %s", run_id, uri, active.info.run_id)
    rid = active.info.run_id
    try:
        mlflow.set_tags(
            {
                "exmap_ray.synced_from": redact(str(out)),
                "exmap_ray.sync_reason": f"MLflow failed mid-run: {pending.get('failed', {}).get('call')}",
            }
        )
        params = {k: v for k, v in flatten(spec).items() if k not in have_params}
        tracking.log_flat_params(params)

        n_metrics = 0
        history = erm_history(out, results)
        logged_steps = {}
        for h in history:
            flat = tracking.flat_metrics(h, "erm.")
            step = h.get("epoch")
            for k in flat:
                if k in have_metrics and k not in logged_steps:
                    logged_steps[k] = {m.step for m in client.get_metric_history(rid, k)}
            todo = {k: v for k, v in flat.items() if step not in logged_steps.get(k, ())}
            if todo:
                mlflow.log_metrics(todo, step=step)
                n_metrics += len(todo)
        final = tracking.flat_metrics({k: results[k] for k in ("erm", "robust", "oracle_dfr") if k in results})
        final.update(tracking.flat_metrics({"timings_s": results.get("timings_s") or {}}))
        final = {k: v for k, v in final.items() if k not in have_metrics}
        if final:
            mlflow.log_metrics(final)
            n_metrics += len(final)

        if results.get("mlflow_run_id") != rid:  # results.json names the run that holds it
            results["mlflow_run_id"] = rid
            write_json(out / "results.json", results)
        artifacts = [name for name in tracking.ARTIFACTS if (out / name).is_file()]
        for name in artifacts:
            tracking.log_artifact(out / name)
    except BaseException:
        try:
            mlflow.end_run("FAILED")
        except Exception:  # noqa: BLE001 - the original error is the one to report
            pass
        raise
    mlflow.end_run("FINISHED")
    (out / tracking.PENDING).unlink(missing_ok=True)
    tracking.write_info(out, uri=uri, experiment=experiment, run_id=rid)
    return {
        "status": "synced",
        "out": str(out),
        "uri": uri,
        "run_id": rid,
        "resumed": existing is not None,
        "params": len(params),
        "metrics": n_metrics,
        "artifacts": artifacts,
    }


def sync_sweep(out: Path, tracking_uri: str | None = None) -> dict:
    """Complete (or recreate) a sweep's parent run, then sync every trial folder that has a marker."""
    import mlflow
    from mlflow.tracking import MlflowClient

    state = _read(out / "sweep.json", "sweep.json is written when a sweep starts")
    summary = _read(
        out / "summary.json",
        "summary.json is written when the sweep finishes; finish it first with exmap-ray tune SPEC --out OUT --resume",
    )
    spec = _read(out / "spec.resolved.json", "spec.resolved.json is written when the sweep starts")
    pending_path = out / tracking.PENDING
    trials = sorted(p.parent for p in (out / "trials").glob(f"*/{tracking.PENDING}"))
    if not pending_path.is_file() and not trials:
        return {"status": "nothing pending", "out": str(out)}
    pending = _read(pending_path, "the sweep's marker") if pending_path.is_file() else {}
    uri, experiment = _target(out, pending, spec, tracking_uri)
    tracking.http_defaults()
    tracking.probe(uri, out)
    exp_id = tracking.setup(uri, experiment, out)
    client = MlflowClient(uri)
    parent_id = state.get("parent_run_id")
    done = {
        "status": "synced",
        "out": str(out),
        "uri": uri,
        "kind": "sweep",
        "params": 0,
        "metrics": 0,
        "artifacts": [],
        "trials": [],
    }
    try:
        existing = _existing_run(client, parent_id)
        done["resumed"] = existing is not None
        if pending_path.is_file() or existing is None:
            active = (
                mlflow.start_run(run_id=existing.info.run_id)
                if existing
                else mlflow.start_run(experiment_id=exp_id, run_name=f"{spec.get('name')} sweep")
            )
            try:
                have_params = dict(existing.data.params) if existing else {}
                have_metrics = set(existing.data.metrics) if existing else set()
                mlflow.set_tags({"exmap_ray.synced_from": redact(str(out))})
                params = {k: v for k, v in flatten(spec).items() if k not in have_params and k != "search.space"}
                tracking.log_flat_params(params)
                metrics = {k: v for k, v in tracking.sweep_metrics(summary).items() if k not in have_metrics}
                if metrics:
                    mlflow.log_metrics(metrics)
                done["artifacts"] = [n for n in tracking.SUMMARY_ARTIFACTS if (out / n).is_file()]
                for n in done["artifacts"]:
                    tracking.log_artifact(out / n)
                done.update(params=len(params), metrics=len(metrics))
            except BaseException:
                mlflow.end_run("FAILED")
                raise
            mlflow.end_run("FINISHED")
            if active.info.run_id != parent_id:
                parent_id = active.info.run_id
                write_json(out / "sweep.json", {**state, "parent_run_id": parent_id})
                write_json(out / "summary.json", {**summary, "mlflow_parent_run_id": parent_id})
            pending_path.unlink(missing_ok=True)
            tracking.write_info(out, uri=uri, experiment=experiment, run_id=parent_id)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001
        raise UserError(
            f"MLflow at '{uri}' failed during sync-mlflow ({type(e).__name__}: "
            f"{' '.join(str(e).split())[:300]}). The markers are kept; run sync-mlflow again "
            f"when the server answers"
        ) from None
    done["run_id"] = parent_id
    for d in trials:  # each trial: its original child run completed, or a new one nested under the parent
        done["trials"].append(sync(d, uri, parent_run_id=parent_id))
    return done


def sync_bench(out: Path, tracking_uri: str | None = None) -> dict:
    """Complete (or recreate) a bench's run from OUT/bench.json: what `bench.run_bench` logs."""
    import mlflow
    from mlflow.tracking import MlflowClient

    summary = _read(out / "bench.json", "bench.json is written when a bench finishes")
    pending_path = out / tracking.PENDING
    if not pending_path.is_file():
        return {"status": "nothing pending", "out": str(out)}
    pending = _read(pending_path, "the bench's marker")
    # written by bench since it logs through sync-mlflow; an older bench folder syncs without params
    spec = _read(out / "spec.resolved.json", "") if (out / "spec.resolved.json").is_file() else {}
    uri, experiment = _target(out, pending, spec, tracking_uri)
    tracking.http_defaults()
    tracking.probe(uri, out)
    exp_id = tracking.setup(uri, experiment, out)
    client = MlflowClient(uri)
    try:
        existing = _existing_run(client, pending.get("run_id") or summary.get("mlflow_run_id"))
        have_params = dict(existing.data.params) if existing else {}
        have_metrics = set(existing.data.metrics) if existing else set()
        active = (
            mlflow.start_run(run_id=existing.info.run_id)
            if existing
            else mlflow.start_run(experiment_id=exp_id, run_name=f"{spec.get('name', out.name)} bench")
        )
        rid = active.info.run_id
        try:
            mlflow.set_tags(
                {
                    "exmap_ray.synced_from": redact(str(out)),
                    "exmap_ray.sync_reason": f"MLflow failed mid-bench: {pending.get('failed', {}).get('call')}",
                }
            )
            params = tracking.bench_params(spec, summary.get("seeds")) if spec else {}
            params = {k: v for k, v in params.items() if k not in have_params}
            tracking.log_flat_params(params)
            metrics = tracking.flat_metrics(tracking.bench_metrics(summary.get("rows") or []))
            metrics = {k: v for k, v in metrics.items() if k not in have_metrics}
            if metrics:
                mlflow.log_metrics(metrics)
            if summary.get("mlflow_run_id") != rid:  # bench.json names the run that holds it (before it is logged)
                write_json(out / "bench.json", {**summary, "mlflow_run_id": rid})
            artifacts = [name for name in tracking.BENCH_ARTIFACTS if (out / name).is_file()]
            for name in artifacts:
                tracking.log_artifact(out / name)
        except BaseException:
            mlflow.end_run("FAILED")
            raise
        mlflow.end_run("FINISHED")
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - the server failed part-way: keep the marker, say so
        raise _failed_midway(uri, e, pending_path) from None
    pending_path.unlink(missing_ok=True)
    tracking.write_info(out, uri=uri, experiment=experiment, run_id=rid)
    return {
        "status": "synced",
        "out": str(out),
        "uri": uri,
        "kind": "bench",
        "run_id": rid,
        "resumed": existing is not None,
        "params": len(params),
        "metrics": len(metrics),
        "artifacts": artifacts,
    }
