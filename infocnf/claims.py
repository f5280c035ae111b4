"""Run claiming: decide which process runs each grid cell and seed, and whether it skips, resumes or starts it.

All decisions about which runs exist live here. MlflowClaimer walks a grid in one process and
matches each (cell, seed) to the runs of one MLflow experiment. OptunaClaimer shares a grid among
worker processes and machines through an Optuna storage, so that no cell runs twice, and uses an
MlflowClaimer to decide what to do with each (cell, seed) it claims.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from mlflow.tracking import MlflowClient

from .tracking import TAG_PREFIX
from .work_queue import (
    CELL_ATTR,
    CLAIMED_AT_ATTR,
    GRID_ATTR,
    GRID_FILE_ATTR,
    OUTCOME_ATTR,
    QUEUED_AT_ATTR,
    RUNS_ATTR,
    SEED_ATTR,
    VERSION_ATTR,
    WORKER_ATTR,
    enqueue_run,
    grid_study_name,
    open_storage,
    requeue_callback,
    utc_now,
)

if TYPE_CHECKING:
    from .grid import Cell, Grid

__all__ = ["Claim", "Claimer", "MlflowClaimer", "OptunaClaimer", "FAILURE_STATUSES"]

log = logging.getLogger(__name__)

# Run outcomes that are recorded and, unless retried on request, not run again.
FAILURE_STATUSES = ("diverged", "step_size_underflow", "step_budget_exceeded", "non_finite", "timeout",
                    "out_of_memory", "error")


@dataclass(frozen=True)
class Claim:
    """Decision for one (cell, seed): action "skip", "resume" or "start", with run_id for skip and resume."""

    action: str
    run_id: str | None = None
    reason: str = ""
    # The recorded status behind a skip: "finished" or a failure status.
    status: str = ""


class Claimer(Protocol):
    """Decides which (cell, seed) pairs of a grid this process runs, and records how each ended."""

    def claims(self, grid: Grid, runs: MlflowClaimer) -> Iterator[tuple[Cell, int, Claim]]: ...
    def release(self, cell: Cell, seed: int, outcome: str) -> None: ...


class MlflowClaimer:
    """Claims runs in one MLflow experiment, matching cell id, seed and config hash by tags.

    A run whose status tag is "finished" is skipped. A run that recorded a failure is skipped
    unless ``retry_failed``, in which case a new run starts beside it (the old one is kept). A run
    that stopped without recording an outcome (killed, interrupted) is resumed under its own id.
    """

    def __init__(self, client: MlflowClient, experiment_id: str, retry_failed: bool = False):
        self.client = client
        self.experiment_id = experiment_id
        self.retry_failed = retry_failed

    def find_runs(self, grid_name: str, cell_id: str, seed: int, config_hash: str) -> list:
        query = (
            f"tags.`{TAG_PREFIX}grid` = '{grid_name}' and tags.`{TAG_PREFIX}cell_id` = '{cell_id}' "
            f"and tags.`{TAG_PREFIX}seed` = '{seed}' and tags.`{TAG_PREFIX}config_hash` = '{config_hash}'"
        )
        return self.client.search_runs([self.experiment_id], filter_string=query, max_results=100)

    def claim(self, grid_name: str, cell_id: str, seed: int, config_hash: str) -> Claim:
        runs = self.find_runs(grid_name, cell_id, seed, config_hash)
        statuses = {run.info.run_id: run.data.tags.get(TAG_PREFIX + "status", "") for run in runs}
        for run_id, status in statuses.items():
            if status == "finished":
                return Claim("skip", run_id, "finished", status="finished")
        failed = [run_id for run_id, status in statuses.items() if status in FAILURE_STATUSES]
        if failed and not self.retry_failed:
            return Claim(
                "skip",
                failed[0],
                f"failed earlier ({statuses[failed[0]]}); pass --retry-failed to rerun",
                status=statuses[failed[0]],
            )
        interrupted = [run_id for run_id, status in statuses.items() if status not in FAILURE_STATUSES]
        if interrupted:
            return Claim("resume", interrupted[0], "interrupted earlier")
        return Claim("start")

    def claims(self, grid: Grid, runs: MlflowClaimer | None = None) -> Iterator[tuple[Cell, int, Claim]]:
        """Claim every (cell, seed) of ``grid`` in grid order: this process runs them all."""
        for cell in grid.cells:
            for seed in grid.seeds:
                yield cell, seed, self.claim(grid.name, cell.cell_id, seed, cell.config_hash(seed))

    def release(self, cell: Cell, seed: int, outcome: str) -> None:
        """Do nothing: the MLflow run's status tag already records the outcome."""


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # It exists but belongs to another user.
        return True
    try:
        # A killed process stays a zombie ("Z") until its parent reaps it, but runs no more code.
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


class _Heartbeat:
    """Records one trial's heartbeat now and then every ``interval_s`` from a daemon thread, until stopped."""

    def __init__(self, storage, trial_id: int, interval_s: float):
        self.storage, self.trial_id, self.interval_s = storage, trial_id, interval_s
        storage.record_heartbeat(trial_id)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-trial-{trial_id}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        from optuna.trial import TrialState

        while not self._stop.wait(self.interval_s):
            try:
                self.storage.record_heartbeat(self.trial_id)
                if self.storage.get_trial(self.trial_id).state != TrialState.RUNNING:
                    log.error("trial id %d was failed by another worker after missed heartbeats; this run "
                              "continues, but its cell was queued again", self.trial_id)
                    return
            except Exception as exc:  # A storage hiccup must not stop the run; the next beat retries.
                log.warning("heartbeat of trial id %d failed: %s: %s", self.trial_id, type(exc).__name__, exc)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class _HeldTrial:
    """The trial this worker holds: its id, its (cell, seed), the MLflow claim and the heartbeat."""

    trial_id: int
    number: int
    cell_id: str
    seed: int
    claim: Claim | None = None
    heartbeat: _Heartbeat | None = None


class OptunaClaimer:
    """Shares one grid among worker processes and machines through an Optuna storage.

    One study per version of the grid (``grid_study_name``) contains one trial per (cell, seed),
    keyed by its user attrs cell_id and seed.

    * Queue: the worker whose ``create_study`` succeeds enqueues every (cell, seed) as a WAITING
      trial, then stamps the study ``queued_at``. The other workers wait for the stamp. Study
      names are unique in a storage, so the queue is filled once even when workers start at the
      same instant (Optuna's ``enqueue_trial(skip_if_exists=True)`` is not atomic across processes).
    * Claim: a worker moves a WAITING trial to RUNNING, which the storage lets only one worker do
      (a row lock in PostgreSQL and MySQL, BEGIN IMMEDIATE in SQLite, the log order of a journal
      file). An MlflowClaimer then decides skip, resume or start, as in one process.
    * Release: a finished run completes its trial, a failed run fails it with the run status as
      user attr ``outcome``, and an interrupted run fails it without one and queues it again.
    * Lost workers: an RDB storage keeps a heartbeat per running trial, and the next worker that
      looks fails a trial silent for ``grace_period_s`` and queues it again. A journal file has no
      heartbeat, so there a worker fails and requeues the trials of dead processes on its own host.
      A requeued run resumes from its checkpoint when the workers share --runs-dir, else restarts.

    A worker leaves when no trial waits and, with ``wait_for_running``, none runs either: the last
    workers stay until the grid is done, to take over the cells of workers that die.
    """

    def __init__(
        self,
        storage_url: str,
        study_name: str | None = None,
        heartbeat_interval_s: int = 60,
        grace_period_s: int = 300,
        wait_for_running: bool = True,
        poll_interval_s: float | None = None,
        max_requeues: int = 3,
        queue_timeout_s: float = 300.0,
    ):
        if heartbeat_interval_s < 1:
            raise ValueError(f"invalid heartbeat interval {heartbeat_interval_s} s: use an integer >= 1")
        if grace_period_s <= heartbeat_interval_s:
            raise ValueError(
                f"invalid grace period {grace_period_s} s: it must exceed the heartbeat interval "
                f"({heartbeat_interval_s} s), for example 5 times it"
            )
        import optuna

        self.storage = open_storage(storage_url, heartbeat_interval_s, grace_period_s, max_requeues)
        # RDB storages get a heartbeat above; a journal file cannot record one.
        self.heartbeat = isinstance(self.storage, optuna.storages.RDBStorage)
        self.study_name = study_name
        self.heartbeat_interval_s = heartbeat_interval_s
        self.wait_for_running = wait_for_running
        self.poll_interval_s = heartbeat_interval_s if poll_interval_s is None else poll_interval_s
        self.queue_timeout_s = queue_timeout_s
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self._requeue = requeue_callback(max_requeues)
        self._held_trial: _HeldTrial | None = None
        self._study = None

    def claims(self, grid: Grid, runs: MlflowClaimer) -> Iterator[tuple[Cell, int, Claim]]:
        """Claim (cell, seed) pairs of ``grid`` from the shared queue until none is left to run."""
        study = self._study = self._open_study(grid)
        study_id = self.storage.get_study_id_from_name(study.study_name)
        cells = {cell.cell_id: cell for cell in grid.cells}
        try:
            while True:
                self._reclaim_lost(study, study_id)
                held_trial = self._pop(study_id)
                if held_trial is None:
                    if not self.wait_for_running or not self._running(study_id):
                        log.info("worker %s: no run of grid %s left to claim", self.worker, grid.name)
                        return
                    time.sleep(self.poll_interval_s)
                    continue
                self._held_trial = held_trial
                cell = cells[held_trial.cell_id]
                seed = held_trial.seed
                held_trial.claim = runs.claim(grid.name, cell.cell_id, seed, cell.config_hash(seed))
                log.info("worker %s claimed %s seed %d (trial %d)", self.worker, cell.cell_id, seed, held_trial.number)
                yield cell, seed, held_trial.claim
                if self._held_trial is held_trial:
                    # The caller asked for the next claim without releasing this one: hand it back.
                    self._finish("")
        finally:
            if self._held_trial is not None:
                # The caller stopped during a run (an interrupt, a crash): hand the run to another worker.
                self._finish("")

    def release(self, cell: Cell, seed: int, outcome: str) -> None:
        """Record the outcome of the held (cell, seed): "finished", "skipped" or a failure status."""
        held_trial = self._held_trial
        assert held_trial is not None, "release without a claim"
        assert (held_trial.cell_id, held_trial.seed) == (cell.cell_id, seed), "release of another claim"
        if outcome == "skipped":
            # A skip repeats what MLflow recorded earlier: finished, or a failure status.
            outcome = held_trial.claim.status or outcome
        self._finish(outcome)

    def _open_study(self, grid: Grid):
        import optuna

        version = grid_study_name(grid)
        name = self.study_name or version
        try:
            study = optuna.create_study(storage=self.storage, study_name=name)
        except optuna.exceptions.DuplicatedStudyError:
            study = optuna.load_study(study_name=name, storage=self.storage)
            self._wait_until_queued(study, version)
            return study
        # This worker created the study, so it alone fills the queue.
        study.set_user_attr(GRID_ATTR, grid.name)
        study.set_user_attr(GRID_FILE_ATTR, grid.path)
        study.set_user_attr(VERSION_ATTR, version)
        study.set_user_attr(RUNS_ATTR, grid.num_runs)
        for cell in grid.cells:
            for seed in grid.seeds:
                enqueue_run(study, cell.cell_id, seed, cell.config_hash(seed))
        study.set_user_attr(QUEUED_AT_ATTR, utc_now())
        log.info("worker %s queued %d runs of grid %s in study %s", self.worker, grid.num_runs, grid.name, name)
        return study

    def _wait_until_queued(self, study, version: str) -> None:
        deadline = time.monotonic() + self.queue_timeout_s
        while QUEUED_AT_ATTR not in study.user_attrs:
            if time.monotonic() > deadline:
                raise ValueError(
                    f"study {study.study_name} has no complete queue after {self.queue_timeout_s:g} s: the worker "
                    f"that created it stopped while queuing, or --study names a study infocnf did not make; "
                    f"delete it (optuna delete-study --study-name {study.study_name} --storage URL) and rerun"
                )
            time.sleep(0.5)
        queued = study.user_attrs.get(VERSION_ATTR)
        if queued != version:
            raise ValueError(
                f"study {study.study_name} queues another version of this grid ({queued}; this grid file is "
                f"{version}): its cells, seeds or configs differ; pass a new --study name"
            )

    def _pop(self, study_id: int) -> _HeldTrial | None:
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import TrialState

        for trial in self.storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.WAITING,)):
            trial_id = self.storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
            try:
                # Only one worker moves a WAITING trial to RUNNING; the storage returns False to the others.
                if not self.storage.set_trial_state_values(trial_id, TrialState.RUNNING):
                    continue
            except UpdateFinishedTrialError:
                continue
            # NOTE: a worker that dies before the next two writes leaves a RUNNING trial that no
            # heartbeat or process check reclaims, and `infocnf status` lists it as running.
            self.storage.set_trial_user_attr(trial_id, WORKER_ATTR, self.worker)
            self.storage.set_trial_user_attr(trial_id, CLAIMED_AT_ATTR, utc_now())
            attrs = trial.user_attrs
            held_trial = _HeldTrial(trial_id, trial.number, attrs[CELL_ATTR], int(attrs[SEED_ATTR]))
            if self.heartbeat:
                held_trial.heartbeat = _Heartbeat(self.storage, trial_id, self.heartbeat_interval_s)
            return held_trial
        return None

    def _running(self, study_id: int) -> bool:
        from optuna.trial import TrialState

        return bool(self.storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)))

    def _reclaim_lost(self, study, study_id: int) -> None:
        import optuna
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import TrialState

        if self.heartbeat:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                # Fails each trial whose heartbeat stopped; the storage's callback queues it again.
                optuna.storages.fail_stale_trials(study)
            return
        host = socket.gethostname()
        for trial in self.storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            worker_host, _, pid = str(trial.user_attrs.get(WORKER_ATTR, "")).rpartition(":")
            if worker_host != host or not pid.isdigit() or _process_alive(int(pid)):
                continue
            trial_id = self.storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
            try:
                self.storage.set_trial_state_values(trial_id, TrialState.FAIL)
            except UpdateFinishedTrialError:
                continue  # Another worker failed it first, and queues it again.
            self._requeue(study, self.storage.get_trial(trial_id))

    def _finish(self, outcome: str) -> None:
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import TrialState

        held_trial, self._held_trial = self._held_trial, None
        if held_trial.heartbeat is not None:
            held_trial.heartbeat.stop()
        try:
            if outcome:
                self.storage.set_trial_user_attr(held_trial.trial_id, OUTCOME_ATTR, outcome)
            state = TrialState.COMPLETE if outcome == "finished" else TrialState.FAIL
            self.storage.set_trial_state_values(held_trial.trial_id, state)
        except UpdateFinishedTrialError:
            log.error(
                "worker %s: %s seed %d (trial %d) was failed by another worker after missed heartbeats and "
                "queued again, so it may run twice; raise --grace-period",
                self.worker, held_trial.cell_id, held_trial.seed, held_trial.number,
            )
            return
        if not outcome:
            self._requeue(self._study, self.storage.get_trial(held_trial.trial_id))
