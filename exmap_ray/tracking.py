"""MLflow tracking: a SQLite store under the output folder by default, or any server.

    mlflow ui --backend-store-uri sqlite:///runs/demo/mlflow.db   # then open http://127.0.0.1:5000

A server that does not answer stops a run before any work (`probe`). One that goes away
mid-run does not stop it: `Tracker` stops calling MLflow after the first failure and writes
OUT/mlflow_pending.json; `exmap-ray sync-mlflow OUT` (see sync_mlflow.py) uploads later.
OUT/tracking.json records the URI, experiment and run id a run used.
"""

from __future__ import annotations

import logging
import os
import re
from contextlib import contextmanager
from pathlib import Path

from .errors import Fenced, UserError
from .storage import write_json

log = logging.getLogger(__name__)
# MLflow 3 sends usage telemetry to its own servers unless told not to: a run's only network traffic should
# be to the tracking URI the user chose (set before mlflow is imported; a user's own setting wins)
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
PENDING = "mlflow_pending.json"  # OUT/<this>: what a run could not log; removed by sync-mlflow
INFO = "tracking.json"  # OUT/<this>: the URI, experiment and run id a run used
# files in OUT logged as MLflow artifacts, by run_pipeline or later by sync-mlflow
ARTIFACTS = ("results.json", "spec.resolved.json", "group_accuracy.png", "heatmaps_by_pseudo_group.png")
# files in a sweep's OUT logged to its parent run, by run_sweep or later by sync-mlflow
SUMMARY_ARTIFACTS = ("summary.json", "summary.csv", "summary.md", "wga_vs_selection_metric.png", "wga_vs_k.png")
# files in a bench's OUT logged to its run, by run_bench or later by sync-mlflow
BENCH_ARTIFACTS = ("bench.md", "bench.csv", "bench.json", "bench_wga.png", "spec.resolved.json")

# MLflow's own defaults (7 retries with exponential backoff, 120 s timeout) stall a run for
# minutes on a dead server; these are set only where the user has not set them.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}


def http_defaults() -> None:
    for k, v in HTTP_DEFAULTS.items():
        os.environ.setdefault(k, v)


def probe(uri: str | None, out: Path | None = None, timeout: float = 10.0) -> None:
    """Fail fast, with a UserError naming `uri`, when an http(s) tracking server does not answer.

    Any HTTP answer (even 401 or 404) counts as reachable; other URIs are not probed here.
    """
    if not uri or not uri.lower().startswith(("http://", "https://")):
        return
    import ssl
    import urllib.error
    import urllib.request

    try:
        # MLflow's light health endpoint; any HTTP answer counts, so other servers are fine too
        urllib.request.urlopen(
            urllib.request.Request(uri.rstrip("/") + "/health", method="GET"), timeout=timeout
        ).close()
        return
    except urllib.error.HTTPError:
        return  # the server answered
    except urllib.error.URLError as e:
        if isinstance(e.reason, ssl.SSLError):
            return  # it answers; TLS settings are MLflow's to apply (MLFLOW_TRACKING_INSECURE_TLS, ...)
        why = str(e.reason)
    except (TimeoutError, OSError) as e:
        why = str(e) or type(e).__name__
    except ValueError as e:
        raise UserError(f"MLflow tracking URI '{uri}' is not a valid URL ({e})") from None
    try:
        local = default_uri(out) if out is not None else "sqlite:///OUT/mlflow.db"
    except UserError:  # a storage-URI OUT has no local default: a server is the only way
        local = None
    fix = (
        f"Start the server, or drop --tracking-uri (and spec key tracking.uri) to log to the local default {local}"
        if local
        else "Start the server, and give an address every node of the cluster can reach"
    )
    raise UserError(f"MLflow tracking server '{uri}' is unreachable ({why}; waited at most {timeout:g} s). {fix}")


def default_uri(out) -> str:
    """sqlite:///OUT/mlflow.db for a local OUT. A storage URI needs a tracking server every node reaches."""
    from .storage import Loc, redact

    loc = Loc.parse(out)
    if not loc.is_local:
        raise UserError(
            f"--out '{redact(str(loc))}' is a storage URI, so MLflow needs a tracking server that every "
            f"node can reach: give --tracking-uri http://HEAD:5000 (or spec key tracking.uri). A "
            f"SQLite file on one machine cannot take the trials' runs from other nodes"
        )
    return f"sqlite:///{loc.path}/mlflow.db"


def log_artifact(loc) -> None:
    """Log a file from the storage root (or a local path) as an MLflow artifact, under its own name."""
    import mlflow

    from .storage import Loc

    mlflow.log_artifact(str(Loc.parse(loc).local_copy()))


def metric_name(name: str) -> str:
    """MLflow allows letters, digits, _ - . / and spaces in metric names."""
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", name.replace(">=", "ge").replace("<", "lt"))


def setup(uri: str, experiment: str, out: Path) -> str:
    """Point MLflow at `uri`, make sure it answers, and return the experiment id."""
    import mlflow

    http_defaults()
    mlflow.set_tracking_uri(uri)
    try:
        exp = mlflow.get_experiment_by_name(experiment)
        if exp is not None:
            return exp.experiment_id
        from .storage import Loc

        loc = Loc.parse(out)
        location = (loc.local_path / "mlartifacts").as_uri() if uri.startswith("sqlite:") and loc.is_local else None
        # (a server keeps its own artifact location: mlflow server --artifacts-destination s3://... on a cluster)
        return mlflow.create_experiment(experiment, artifact_location=location)
    except Exception as e:  # noqa: BLE001 - any failure here means the store is unusable
        raise UserError(
            f"MLflow tracking URI '{uri}' cannot be used ({type(e).__name__}: {str(e)[:200]}). "
            f"Drop --tracking-uri to use the local default sqlite:///OUT/mlflow.db"
        ) from None


def log_flat_params(params: dict) -> None:
    import mlflow

    items = [(k, "null" if v is None else str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        mlflow.log_params(dict(items[i : i + 100]))


def log_metrics(metrics: dict, prefix: str = "", step: int | None = None) -> None:
    """Log every finite number in a nested dict, with dotted names."""
    import mlflow

    flat = flat_metrics(metrics, prefix)
    if flat:
        mlflow.log_metrics(flat, step=step)


def flat_metrics(metrics: dict, prefix: str = "") -> dict[str, float]:
    """Every finite number in a nested dict, under its dotted (MLflow-safe) name."""
    import math

    flat = {}

    def walk(d, p):
        for k, v in d.items():
            key = f"{p}{k}"
            if isinstance(v, dict):
                walk(v, key + ".")
            elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                flat[metric_name(key)] = float(v)

    walk(metrics, prefix)
    return flat


def sweep_metrics(summary: dict) -> dict:
    """A sweep parent run's metrics (run_sweep, sync-mlflow): each choice's test WGA and selection metric."""
    m = {}
    for tag, row in (("label_free", summary.get("label_free_choice")), ("oracle", summary.get("oracle_choice"))):
        if row:
            m.update(
                {
                    f"{tag}_choice.test_worst_group_acc": row["test_worst_group_acc"],
                    f"{tag}_choice.selection_metric": row["selection_metric"],
                }
            )
    return m


def bench_metrics(rows: list[dict]) -> dict:
    """A bench run's metrics (run_bench, sync-mlflow): every row's mean and std, under the row's name."""
    return {metric_name(r["row"]).replace(" ", "_"): {k: v for k, v in r.items() if isinstance(v, float)} for r in rows}


def bench_params(spec: dict, seeds: list) -> dict:
    """A bench run's params (run_bench, sync-mlflow): the flattened spec and the seeds."""
    from .spec import flatten

    return {**flatten(spec), "bench.seeds": seeds}


def write_info(out: Path, **info) -> None:
    """Merge `info` into OUT/tracking.json (the URI, experiment and run id a run used)."""
    from .storage import Loc
    from .storage import read_json

    path = Loc.parse(out) / INFO
    old = read_json(path) if path.exists() else {}
    write_json(path, {**old, **info})


class Tracker:
    """The MLflow calls of one pipeline run, made so that losing the tracking server loses no results.

        tracker = Tracker(uri, out, experiment)
        with tracker.run(experiment_id=exp_id, run_name="x"):
            tracker.call("log_metrics", log_metrics, {"acc": 1.0})

    The first failed call writes OUT/mlflow_pending.json (URI, run id, what failed) and logs one
    warning; from then on no call reaches MLflow and the run goes on. A run that logs everything
    removes a stale marker left by an earlier run in OUT (whose results it has overwritten).
    """

    def __init__(self, uri: str, out: Path, experiment: str, later: str = "sync-mlflow"):
        from .storage import Loc

        self.uri, self.out, self.experiment = uri, Loc.parse(out), experiment
        self.later = later  # how the lost logging is made up: "sync-mlflow" (run, sweep, bench), or "rerun"
        self.run_id: str | None = None
        self.failure: dict | None = None
        write_info(self.out, uri=uri, experiment=experiment, run_id=None)

    @property
    def pending(self) -> bool:
        return self.failure is not None

    def call(self, what: str, fn, *args, **kwargs):
        """`fn(*args, **kwargs)`, or None once MLflow has failed (now or before)."""
        if self.failure is not None:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - any failure: stop talking to MLflow, keep the results
            self._lost(what, e)
            return None

    def mark_lost(self, what: str, e: Exception) -> None:
        """Record that MLflow failed outside `call` (e.g. in `setup`): nothing is sent from now on."""
        if self.failure is None:
            self._lost(what, e)

    def _lost(self, what: str, e: Exception) -> None:
        import time

        self.failure = {"call": what, "error": f"{type(e).__name__}: {' '.join(str(e).split())[:400]}"}
        write_json(
            self.out / PENDING,
            {
                "uri": self.uri,
                "experiment": self.experiment,
                "run_id": self.run_id,
                "failed": self.failure,
                "time": time.time(),
            },
        )
        how = (
            f"upload them later with: exmap-ray sync-mlflow {self.out}"
            if self.later == "sync-mlflow"
            else "to log them, run the same command again once the server is back (with the same --cache its "
            "stages are reused)"
        )
        log.warning(
            "MLflow at %s became unreachable (%s failed: %s). The run goes on without MLflow and "
            "keeps every result in %s; %s",
            self.uri,
            what,
            self.failure["error"][:200],
            self.out,
            how,
        )

    @contextmanager
    def run(self, **start_kwargs):
        """`mlflow.start_run(**start_kwargs)` as a context that survives the server going away."""
        import mlflow

        active = self.call("start_run", mlflow.start_run, **start_kwargs)
        if active is not None:
            self.run_id = active.info.run_id
            write_info(self.out, run_id=self.run_id)
        status = "FAILED"
        try:
            yield self
            status = "FINISHED"
        except (KeyboardInterrupt, Fenced):  # interrupted, or fenced off by a resumed sweep (fence.py)
            status = "KILLED"
            raise
        finally:
            if active is not None:
                if self.failure is None:
                    self.call("end_run", mlflow.end_run, status)
                else:
                    _drop_active_run(self.run_id)
            if status == "FINISHED" and self.failure is None:
                (self.out / PENDING).unlink(missing_ok=True)


def _drop_active_run(run_id: str | None) -> None:
    """Forget the active run in this process without a request to the (gone) server."""
    import mlflow

    active = mlflow.active_run()
    if active is None or active.info.run_id != run_id:
        return
    try:
        from mlflow.tracking.fluent import _active_run_stack

        _active_run_stack.get().pop()
        os.environ.pop("MLFLOW_RUN_ID", None)
    except Exception:  # noqa: BLE001 - a private API; end_run pops the run before it calls the server
        try:
            mlflow.end_run("FAILED")
        except Exception:  # noqa: BLE001
            pass
