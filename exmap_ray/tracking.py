"""MLflow tracking: a SQLite store under the output folder by default, or any server.

    mlflow ui --backend-store-uri sqlite:///runs/demo/mlflow.db   # then open http://127.0.0.1:5000
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from .errors import UserError

log = logging.getLogger(__name__)


def default_uri(out: Path) -> str:
    return f"sqlite:///{(Path(out) / 'mlflow.db').resolve()}"


def metric_name(name: str) -> str:
    """MLflow allows letters, digits, _ - . / and spaces in metric names."""
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", name.replace(">=", "ge").replace("<", "lt"))


def setup(uri: str, experiment: str, out: Path) -> str:
    """Point MLflow at `uri`, make sure it answers, and return the experiment id."""
    import mlflow

    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    mlflow.set_tracking_uri(uri)
    try:
        exp = mlflow.get_experiment_by_name(experiment)
        if exp is not None:
            return exp.experiment_id
        location = (Path(out) / "mlartifacts").resolve().as_uri() if uri.startswith("sqlite:") else None
        return mlflow.create_experiment(experiment, artifact_location=location)
    except Exception as e:  # noqa: BLE001 - any failure here means the store is unusable
        raise UserError(f"MLflow tracking URI '{uri}' cannot be used ({type(e).__name__}: {str(e)[:200]}). "
                        f"Drop --tracking-uri to use the local default sqlite:///OUT/mlflow.db") from None


def log_flat_params(params: dict) -> None:
    import mlflow

    items = [(k, "null" if v is None else str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        mlflow.log_params(dict(items[i:i + 100]))


def log_metrics(metrics: dict, prefix: str = "", step: int | None = None) -> None:
    """Log every finite number in a nested dict, with dotted names."""
    import math

    import mlflow

    flat = {}

    def walk(d, p):
        for k, v in d.items():
            key = f"{p}{k}"
            if isinstance(v, dict):
                walk(v, key + ".")
            elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                flat[metric_name(key)] = float(v)

    walk(metrics, prefix)
    if flat:
        mlflow.log_metrics(flat, step=step)
