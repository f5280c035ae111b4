"""Run claiming: decide for each grid cell and seed whether to skip, resume or start a run.

All decisions about which runs exist live here, so that a shared store (an MLflow server, an
Optuna RDB storage) can later back several workers without any cell running twice.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from mlflow.tracking import MlflowClient

from .tracking import TAG_PREFIX

__all__ = ["Claim", "MlflowClaimer", "FAILURE_STATUSES"]

log = logging.getLogger(__name__)

# Run outcomes that are recorded and, unless retried on request, not run again.
FAILURE_STATUSES = ("diverged", "step_size_underflow", "step_budget_exceeded", "non_finite", "timeout",
                    "out_of_memory", "error")


@dataclass(frozen=True)
class Claim:
    """What to do for one (cell, seed): action is "skip", "resume" or "start"; run_id for skip/resume."""

    action: str
    run_id: str | None = None
    reason: str = ""


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
                return Claim("skip", run_id, "finished")
        failed = [run_id for run_id, status in statuses.items() if status in FAILURE_STATUSES]
        if failed and not self.retry_failed:
            return Claim("skip", failed[0], f"failed earlier ({statuses[failed[0]]}); pass --retry-failed to rerun")
        interrupted = [run_id for run_id, status in statuses.items() if status not in FAILURE_STATUSES]
        if interrupted:
            return Claim("resume", interrupted[0], "interrupted earlier")
        return Claim("start")
