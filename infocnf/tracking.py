"""MLflow tracking: open a store with a clear error, and log a run's events as a trainer callback."""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any

# MLflow 3 sends telemetry on import unless both are set.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
# Reports download artifacts one by one; a progress bar per file is noise.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

import mlflow  # noqa: E402
from mlflow.entities import Metric, Param, RunTag  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

__all__ = ["default_tracking_uri", "open_tracking", "MlflowCallback", "TAG_PREFIX", "log_params"]

log = logging.getLogger(__name__)

# Tags this harness sets on every run, for example infocnf.cell_id and infocnf.status.
TAG_PREFIX = "infocnf."
_BATCH_PARAMS = 100  # MLflow's limit of params per log_batch call.
_BATCH_METRICS = 1000  # MLflow's limit of metrics per log_batch call.


def default_tracking_uri() -> str:
    """Return the URI of a SQLite store ``mlflow.db`` in the working directory, MLflow's own default."""
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def open_tracking(uri: str | None, experiment: str, create: bool = True) -> tuple[MlflowClient, str, str | None]:
    """Open the tracking store and get (or create) the experiment; returns (client, uri, experiment id).

    With ``create=False`` the store is only read: a missing experiment gives None as its id, and
    a SQLite file that does not exist raises ValueError instead of becoming a new, empty store.
    Raises ValueError naming the URI when the store cannot be opened.
    """
    default = uri is None
    uri = uri or default_tracking_uri()
    database = _sqlite_path(uri)
    if database is not None:
        if not database.parent.is_dir():
            raise ValueError(
                f"cannot open MLflow tracking store {uri}: folder {database.parent} does not exist; create it or "
                f"pass another --tracking-uri"
            )
        if not create and not database.is_file():
            where = " (the default store, mlflow.db in the working directory)" if default else ""
            raise ValueError(
                f"MLflow tracking store {database}{where} not found, and reading a store creates none; pass "
                f"--tracking-uri sqlite:///PATH/mlflow.db pointing at the store that `infocnf ablate` wrote"
            )
    if uri.startswith(("http://", "https://")):
        _check_server(uri)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    try:
        found = client.get_experiment_by_name(experiment)
        if found is None and not create:
            return client, uri, None
        experiment_id = (
            found.experiment_id
            if found is not None
            else client.create_experiment(experiment, artifact_location=_artifact_location(uri, experiment))
        )
        if found is not None and found.lifecycle_stage == "deleted":
            client.restore_experiment(experiment_id)
    except Exception as exc:  # MLflow raises many types here: SQLAlchemy, REST, file errors.
        raise ValueError(
            f"cannot open MLflow tracking store {uri}: {type(exc).__name__}: {exc}; check --tracking-uri "
            f"(a sqlite:///PATH file, a database URI or a running server's http://HOST:PORT)"
        ) from exc
    return client, uri, experiment_id


def _sqlite_path(uri: str) -> Path | None:
    """Return the database file of a sqlite:/// URI, or None for other URIs and in-memory SQLite."""
    if not uri.startswith("sqlite:///"):
        return None
    # SQLAlchemy reads "?..." after the path as driver options, not as part of the file name.
    path = uri[len("sqlite:///") :].split("?", 1)[0]
    if path in ("", ":memory:"):
        return None
    return Path(path)


def _artifact_location(uri: str, experiment: str) -> str | None:
    # MLflow puts a SQLite store's artifacts under ./mlruns of the working directory. Keeping
    # them beside the database lets a store and its artifacts move together.
    if uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///") :]).parent / "mlartifacts" / experiment
        return folder.resolve().as_uri()
    return None


def _check_server(uri: str) -> None:
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=10).read()
    except (urllib.error.URLError, OSError) as exc:
        raise ValueError(
            f"cannot open MLflow tracking store {uri}: no server responded ({exc}); start one with "
            f"`mlflow server --host 127.0.0.1 --port PORT` or pass another --tracking-uri"
        ) from exc


def _param_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_param_value(v) for v in value) + "]"
    return str(value)


def log_params(client: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    """Log params not yet on the run (MLflow rejects changing a logged param)."""
    existing = client.get_run(run_id).data.params
    items = [Param(k, _param_value(v)) for k, v in params.items() if k not in existing]
    for start in range(0, len(items), _BATCH_PARAMS):
        client.log_batch(run_id, params=items[start : start + _BATCH_PARAMS])


def _log_metrics(client: MlflowClient, run_id: str, values: dict[str, Any], step: int) -> None:
    now = int(time.time() * 1000)
    items = [
        Metric(k, float(v), now, step)
        for k, v in values.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
    ]
    for start in range(0, len(items), _BATCH_METRICS):
        client.log_batch(run_id, metrics=items[start : start + _BATCH_METRICS])


class MlflowCallback:
    """Trainer callback that logs config params, per-epoch metrics, final metrics and artifacts.

    Final metrics of the selected model are logged with the prefix ``final_`` so they never mix
    with the per-epoch curves of the same name. The run ends FINISHED, or FAILED with the failure
    status and reason as tags.
    """

    def __init__(self, client: MlflowClient, run_id: str):
        self.client = client
        self.run_id = run_id

    def on_start(self, trainer) -> None:
        log_params(self.client, self.run_id, trainer.config.flat())
        self.client.set_tag(self.run_id, TAG_PREFIX + "status", "running")

    def on_epoch_end(self, trainer, row: dict[str, float]) -> None:
        _log_metrics(self.client, self.run_id, row, step=int(row["epoch"]))

    def on_end(self, trainer, result) -> None:
        final = {f"final_{k}": v for k, v in result.metrics.items()}
        _log_metrics(self.client, self.run_id, final, step=trainer.epoch)
        for name in ("config.toml", "history.csv", "metrics.json", "tolerances.csv", "trajectories.npz"):
            path = Path(trainer.output_dir) / name
            if path.is_file():
                self.client.log_artifact(self.run_id, str(path))
        tags = [RunTag(TAG_PREFIX + "status", result.status)]
        if result.reason:
            tags.append(RunTag(TAG_PREFIX + "reason", result.reason[:5000]))
        self.client.log_batch(self.run_id, tags=tags)
        self.client.set_terminated(self.run_id, "FINISHED" if result.status == "finished" else "FAILED")
