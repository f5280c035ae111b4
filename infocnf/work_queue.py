"""The Optuna storage behind a shared grid: open it, name a grid's study, and read the grid's progress.

One study per version of a grid contains one trial per (cell, seed), and
infocnf.claims.OptunaClaimer fills and drains it. This module has what the workers and
``infocnf status`` share.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import random
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .grid import Grid

__all__ = [
    "open_storage",
    "grid_study_name",
    "enqueue_run",
    "requeue_callback",
    "utc_now",
    "hide_password",
    "open_shared_tracking",
    "RunProgress",
    "GridProgress",
    "read_progress",
    "CELL_ATTR",
    "SEED_ATTR",
    "CONFIG_HASH_ATTR",
    "ATTEMPT_ATTR",
    "WORKER_ATTR",
    "CLAIMED_AT_ATTR",
    "OUTCOME_ATTR",
    "GRID_ATTR",
    "GRID_FILE_ATTR",
    "VERSION_ATTR",
    "RUNS_ATTR",
    "QUEUED_AT_ATTR",
]

log = logging.getLogger(__name__)

# Storage URL forms that open_storage accepts, for error messages.
_STORAGE_FORMS = "sqlite:///PATH, postgresql://USER:PASSWORD@HOST:PORT/DATABASE, mysql://... or journal:PATH"
# Trial user attrs: the (cell, seed) key and its config hash, the attempt number (1, 2, ...), the
# worker (host:pid) holding the trial and since when, and the run status it ended with.
CELL_ATTR, SEED_ATTR, CONFIG_HASH_ATTR, ATTEMPT_ATTR = "cell_id", "seed", "config_hash", "attempt"
WORKER_ATTR, CLAIMED_AT_ATTR, OUTCOME_ATTR = "worker", "claimed_at", "outcome"
# Study user attrs: the grid's name, file and version, its number of runs, and when its queue was complete.
GRID_ATTR, GRID_FILE_ATTR, VERSION_ATTR, RUNS_ATTR, QUEUED_AT_ATTR = "grid", "grid_file", "grid_version", "runs", "queued_at"


def utc_now() -> str:
    """Return the current UTC time as ISO 8601 to the second, the form of claimed_at and queued_at."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def hide_password(url: str) -> str:
    """Return the storage URL with its password, if any, replaced by ***, for messages and logs."""
    from sqlalchemy.engine import make_url

    if url.startswith("journal:"):
        return url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # An unparsable URL has no password field to hide; show only its scheme.
        return url.split(":", 1)[0] + ":..."


def enqueue_run(study, cell_id: str, seed: int, config_hash: str, attempt: int = 1) -> None:
    """Queue one (cell, seed) as a WAITING trial of ``study``; ``attempt`` counts from 1."""
    study.enqueue_trial(
        {CELL_ATTR: cell_id, SEED_ATTR: seed},
        user_attrs={CELL_ATTR: cell_id, SEED_ATTR: seed, CONFIG_HASH_ATTR: config_hash, ATTEMPT_ATTR: attempt},
    )


def requeue_callback(max_requeues: int):
    """A callback (study, failed trial) that queues the trial's (cell, seed) again, at most ``max_requeues`` times.

    An RDB storage with a heartbeat calls it for each trial whose heartbeat stopped, in the one
    worker whose update failed that trial. The copy carries only the key and the attempt number,
    so the dead worker's attrs never describe its successor.
    """

    def requeue(study, trial) -> None:
        attrs = trial.user_attrs
        cell_id, seed, attempt = attrs[CELL_ATTR], int(attrs[SEED_ATTR]), int(attrs.get(ATTEMPT_ATTR, 1))
        if attempt > max_requeues:
            log.error("%s seed %d lost its worker on %d attempts; not queued again (see `infocnf status`)",
                      cell_id, seed, attempt)
            return
        log.warning("%s seed %d: worker %s stopped while holding it (trial %d); queued again",
                    cell_id, seed, attrs.get(WORKER_ATTR, "?"), trial.number)
        enqueue_run(study, cell_id, seed, str(attrs.get(CONFIG_HASH_ATTR, "")), attempt + 1)

    return requeue


def _serialize_sqlite(engine) -> None:
    """Make every SQLite transaction take the write lock when it begins (BEGIN IMMEDIATE).

    Python's sqlite3 driver begins a transaction only at the first write, so two processes can
    both read a trial as WAITING and both set it to RUNNING. With optuna 5.1, three processes
    popping 200 queued trials popped 27 to 45 of them twice. With BEGIN IMMEDIATE a second
    transaction waits for the first to commit. This is SQLAlchemy's recipe for pysqlite
    (its SQLite dialect docs, "Serializable isolation / Savepoints / Transactional DDL").
    """
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _no_implicit_begin(dbapi_connection, connection_record):
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin_immediate(connection):
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # Connections pooled while Optuna created its tables predate the listeners.


def open_storage(url: str, heartbeat_interval_s: int | None = None, grace_period_s: int | None = None,
                 max_requeues: int = 3, create: bool = True):
    """Open an Optuna storage: an RDB URL (sqlite:///, postgresql://, mysql://) or journal:PATH.

    With ``heartbeat_interval_s``, an RDB storage records a heartbeat for each running trial.
    The next worker that checks fails a trial without one for ``grace_period_s`` seconds, and
    queues it again, at most ``max_requeues`` times. A journal file has no heartbeat. With
    ``create`` false, a missing SQLite or journal file is an error instead of a new store.
    Raises ValueError naming the URL, password hidden, when the storage cannot be opened.
    """
    import optuna

    if url.startswith("journal:"):
        return _open_journal(Path(url[len("journal:") :]), create)
    if not url.startswith(("sqlite:///", "postgresql", "mysql")):
        raise ValueError(f"invalid --storage {url!r}: use {_STORAGE_FORMS}")
    shown_url = hide_password(url)
    sqlite = url.startswith("sqlite:///")
    if sqlite:
        path = Path(url[len("sqlite:///") :])
        if not path.parent.is_dir() or (not create and not path.is_file()):
            missing = path if path.parent.is_dir() else path.parent
            raise ValueError(f"cannot open Optuna storage {shown_url}: {missing} does not exist; check --storage")
    kwargs: dict[str, Any] = {}
    if heartbeat_interval_s is not None:
        keyword = "heartbeat_stale_trial_callback"
        if "heartbeat_stale_trial_callback" not in inspect.signature(optuna.storages.RDBStorage).parameters:
            keyword = "failed_trial_callback"  # Its name before optuna 4.9.
        kwargs = {"heartbeat_interval": heartbeat_interval_s, "grace_period": grace_period_s,
                  keyword: requeue_callback(max_requeues)}
    # SQLite's busy timeout: how long a transaction waits for another process's write lock.
    engine_kwargs = {"connect_args": {"timeout": 60}} if sqlite else {}
    attempts = 5
    for attempt in range(1, attempts + 1):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                storage = optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **kwargs)
            break
        except ImportError as exc:
            raise ValueError(
                f"cannot open Optuna storage {shown_url}: its database driver is missing ({exc}); install it, "
                f"for example `pip install 'psycopg[binary]'` for postgresql://"
            ) from exc
        except Exception as exc:  # SQLAlchemy and Optuna raise many types here.
            # Workers that start together on a new database race to create its tables; the loser retries.
            if attempt == attempts:
                raise ValueError(
                    f"cannot open Optuna storage {shown_url}: {type(exc).__name__}: {exc}; check --storage "
                    f"({_STORAGE_FORMS}) and that its database server is running"
                ) from exc
            log.info("opening Optuna storage %s failed (%s); retrying", shown_url, type(exc).__name__)
            time.sleep(attempt * random.uniform(0.2, 0.6))
    if sqlite:
        _serialize_sqlite(storage.engine)
    return storage


def _open_journal(path: Path, create: bool):
    import optuna

    try:
        from optuna.storages.journal import JournalFileBackend
    except ImportError:  # Its name before optuna 4.0.
        from optuna.storages import JournalFileStorage as JournalFileBackend

    if not path.parent.is_dir() or (not create and not path.is_file()):
        missing = path if path.parent.is_dir() else path.parent
        raise ValueError(f"cannot open Optuna journal storage journal:{path}: {missing} does not exist; check --storage")
    return optuna.storages.JournalStorage(JournalFileBackend(str(path)))


def open_shared_tracking(uri: str | None, experiment: str) -> None:
    """Create the MLflow tracking store and experiment that several workers share, also when they start together.

    MLflow's SQLite store cannot create its tables from several processes at once: with mlflow
    3.17, three processes opening a new store together failed with errors such as "duplicate
    column name", at times all three. So workers on one machine take turns under a lock file
    beside the database. On a tracking server, workers that create one experiment at once can
    fail with RESOURCE_ALREADY_EXISTS (one or two of three in the same test), so a failed
    worker retries and finds the experiment.
    """
    import fcntl

    from .tracking import default_tracking_uri, open_tracking

    uri = uri or default_tracking_uri()
    lock_path = Path(uri[len("sqlite:///") :] + ".lock") if uri.startswith("sqlite:///") else None
    attempts = 3
    for attempt in range(1, attempts + 1):
        try:
            if lock_path is None or not lock_path.parent.is_dir():
                open_tracking(uri, experiment)  # A missing folder raises open_tracking's own error.
            else:
                with open(lock_path, "w") as lock:
                    fcntl.flock(lock, fcntl.LOCK_EX)
                    open_tracking(uri, experiment)
            return
        except ValueError:
            if attempt == attempts:
                raise
            log.info("opening MLflow experiment %s failed, maybe created by another worker now; retrying", experiment)
            time.sleep(attempt * random.uniform(0.5, 1.5))


def grid_study_name(grid: Grid) -> str:
    """Return the name of the study that queues this version of the grid: its name and a hash of its runs."""
    runs = sorted((cell.cell_id, seed, cell.config_hash(seed)) for cell in grid.cells for seed in grid.seeds)
    return f"{grid.name}-{hashlib.sha256(json.dumps(runs).encode()).hexdigest()[:10]}"


@dataclass(frozen=True)
class RunProgress:
    """One (cell, seed) of a queued grid; ``state`` is "done", "running", "failed" or "pending"."""

    cell_id: str
    seed: int
    state: str
    # The worker (host:pid) holding a running trial, and since when (UTC, ISO 8601).
    worker: str = ""
    since: str = ""
    # The run status of a done or failed run.
    outcome: str = ""
    # Trials of this (cell, seed): 1, plus 1 each time it was queued again.
    attempts: int = 1


@dataclass(frozen=True)
class GridProgress:
    """One queued grid: its study, the grid's name, its number of runs and the state of each queued run."""

    study: str
    grid: str
    total: int
    runs: tuple[RunProgress, ...]

    def count(self, state: str) -> int:
        counted = sum(1 for run in self.runs if run.state == state)
        # Runs not in the queue yet (while the first worker fills it) are pending too.
        return counted + (self.total - len(self.runs) if state == "pending" else 0)


def read_progress(url: str, grid_name: str | None = None) -> list[GridProgress]:
    """Read the progress of every grid queued in the storage at ``url``, or of the grid named ``grid_name``."""
    storage = open_storage(url, create=False)
    progress = []
    for study in storage.get_all_studies():
        attrs = study.user_attrs
        if VERSION_ATTR not in attrs or (grid_name is not None and attrs.get(GRID_ATTR) != grid_name):
            continue
        study_id = storage.get_study_id_from_name(study.study_name)
        # Per (cell, seed): its latest trial, which decides the state, its first trial number and its trial count.
        latest: dict[tuple[str, int], Any] = {}
        first: dict[tuple[str, int], int] = {}
        attempts: dict[tuple[str, int], int] = {}
        for trial in storage.get_all_trials(study_id, deepcopy=False):
            if CELL_ATTR not in trial.user_attrs:
                continue
            key = (trial.user_attrs[CELL_ATTR], int(trial.user_attrs[SEED_ATTR]))
            attempts[key] = attempts.get(key, 0) + 1
            first[key] = min(first.get(key, trial.number), trial.number)
            if key not in latest or trial.number > latest[key].number:
                latest[key] = trial
        runs = tuple(_run_progress(latest[key], attempts[key]) for key in sorted(latest, key=first.get))
        progress.append(GridProgress(study.study_name, attrs.get(GRID_ATTR, "?"), int(attrs.get(RUNS_ATTR, len(runs))), runs))
    return progress


def _run_progress(trial, attempts: int) -> RunProgress:
    from optuna.trial import TrialState

    state = {TrialState.WAITING: "pending", TrialState.RUNNING: "running", TrialState.COMPLETE: "done"}.get(
        trial.state, "failed"
    )
    outcome = str(trial.user_attrs.get(OUTCOME_ATTR, ""))
    if state == "failed" and not outcome:
        # A lost worker's trial is queued again as a newer trial; as the latest, it was not.
        outcome = "worker lost; not queued again"
    worker = since = ""
    if state == "running":
        worker = str(trial.user_attrs.get(WORKER_ATTR, "?"))
        since = str(trial.user_attrs.get(CLAIMED_AT_ATTR, ""))
    return RunProgress(
        trial.user_attrs[CELL_ATTR], int(trial.user_attrs[SEED_ATTR]), state, worker, since, outcome, attempts
    )
