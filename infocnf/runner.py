"""The grid runner: run every cell x seed of a grid, tracked in MLflow, resumable and fault-tolerant."""

from __future__ import annotations

import logging
import re
import subprocess
import traceback
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from mlflow.entities import RunTag

from .claims import Claimer, MlflowClaimer
from .grid import Cell, Grid
from .tracking import TAG_PREFIX, MlflowCallback, open_tracking

__all__ = ["GridSummary", "run_grid", "run_directory", "git_commit"]

log = logging.getLogger(__name__)


@dataclass
class GridSummary:
    """Counts of what one invocation did, and the MLflow ids of the runs it touched."""

    experiment: str
    tracking_uri: str
    started: int = 0
    resumed: int = 0
    skipped: int = 0
    # Of the skipped runs, those whose recorded run had failed (rerun with retry_failed).
    skipped_failed: int = 0
    finished: int = 0
    failed: int = 0
    run_ids: list[str] = field(default_factory=list)
    failures: list[tuple[str, int, str]] = field(default_factory=list)


def git_commit() -> str:
    """Return the commit of the working tree this code runs from, or "unknown" outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, cwd=Path(__file__).parent
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", text.replace(",", "__"))


def run_directory(runs_dir: str | Path, grid: Grid, cell: Cell, seed: int, attempt: int = 0) -> Path:
    """Folder of one run's files: RUNS_DIR/GRID/CELL/seedN-HASH (with -retryK for retries)."""
    name = f"seed{seed}-{cell.config_hash(seed)[:8]}" + (f"-retry{attempt}" if attempt else "")
    return Path(runs_dir) / _slug(grid.name) / _slug(cell.cell_id) / name


def _train(grid: Grid, config: Any, output_dir: Path, callbacks: list[Any]):
    if grid.kind == "latent_ode":
        from .latent_ode import run_latent_ode

        return run_latent_ode(config, output_dir, callbacks)
    from .train import Trainer

    return Trainer(config, output_dir, callbacks).fit(resume=True)


def run_grid(
    grid: Grid,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    runs_dir: str | Path = "runs",
    retry_failed: bool = False,
    make_callbacks: Callable[[Cell, int], list[Any]] | None = None,
    on_run_done: Callable[[Cell, int, str], None] | None = None,
    claimer: Claimer | None = None,
) -> GridSummary:
    """Run every (cell, seed) of ``grid`` not yet finished, logging each as one MLflow run.

    Finished runs are skipped, interrupted ones resume from their checkpoint under the same
    MLflow run, and a failed run is recorded with status FAILED and its reason before the grid
    goes on. ``make_callbacks(cell, seed)`` adds trainer callbacks (progress bars, for example);
    ``on_run_done(cell, seed, outcome)`` is called after each (cell, seed), skipped ones included.
    ``claimer`` decides which (cell, seed) pairs this process runs: by default all of them, in
    grid order; an OptunaClaimer shares the grid with other workers.
    """
    experiment = experiment or grid.experiment
    client, uri, experiment_id = open_tracking(tracking_uri, experiment)
    runs = MlflowClaimer(client, experiment_id, retry_failed=retry_failed)
    claimer = claimer or runs
    summary = GridSummary(experiment, uri)
    commit = git_commit()
    # closing() hands back a claim still held when the loop stops early (an interrupt, a crash).
    with closing(claimer.claims(grid, runs)) as claims:
        for cell, seed, claim in claims:
            config_hash = cell.config_hash(seed)
            if claim.action == "skip":
                log.info("skip %s seed %d: run %s %s", cell.cell_id, seed, claim.run_id, claim.reason)
                summary.skipped += 1
                if claim.status and claim.status != "finished":
                    summary.skipped_failed += 1
                claimer.release(cell, seed, "skipped")
                if on_run_done:
                    on_run_done(cell, seed, "skipped")
                continue
            attempt = len(runs.find_runs(grid.name, cell.cell_id, seed, config_hash)) if claim.action == "start" else 0
            output_dir = run_directory(runs_dir, grid, cell, seed, attempt)
            if claim.action == "resume":
                run_id = claim.run_id
                client.update_run(run_id, status="RUNNING")
                output_dir = Path(client.get_run(run_id).data.tags.get(TAG_PREFIX + "output_dir", str(output_dir)))
                summary.resumed += 1
                log.info("resume %s seed %d: run %s from %s", cell.cell_id, seed, run_id, output_dir)
            else:
                tags = {
                    "grid": grid.name,
                    "grid_file": grid.path,
                    "cell_id": cell.cell_id,
                    "seed": str(seed),
                    "config_hash": config_hash,
                    "git_commit": commit,
                    "kind": grid.kind,
                    "output_dir": str(output_dir),
                    "status": "running",
                }
                tags.update({f"level.{k}": v for k, v in cell.levels.items()})
                run = client.create_run(
                    experiment_id, run_name=f"{cell.cell_id} seed={seed}", tags={TAG_PREFIX + k: v for k, v in tags.items()}
                )
                run_id = run.info.run_id
                summary.started += 1
                log.info("start %s seed %d: run %s in %s", cell.cell_id, seed, run_id, output_dir)
            summary.run_ids.append(run_id)
            callbacks = [MlflowCallback(client, run_id)] + (make_callbacks(cell, seed) if make_callbacks else [])
            try:
                result = _train(grid, cell.configs[seed], output_dir, callbacks)
            except KeyboardInterrupt:
                # Leave the run resumable: no outcome tag, so the next invocation resumes it.
                client.set_terminated(run_id, "KILLED")
                log.warning("interrupted %s seed %d: run %s is left to resume", cell.cell_id, seed, run_id)
                raise
            except ValueError as exc:
                _record_error(client, run_id, f"invalid input: {exc}")
                summary.failed += 1
                summary.failures.append((cell.cell_id, seed, str(exc)))
                log.error("failed %s seed %d: run %s: %s", cell.cell_id, seed, run_id, exc)
                claimer.release(cell, seed, "error")
                if on_run_done:
                    on_run_done(cell, seed, "failed")
                continue
            except Exception as exc:  # Any other crash of one cell must not stop the grid.
                _record_error(client, run_id, f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=5)}")
                summary.failed += 1
                summary.failures.append((cell.cell_id, seed, f"{type(exc).__name__}: {exc}"))
                log.error("failed %s seed %d: run %s crashed: %s", cell.cell_id, seed, run_id, exc)
                claimer.release(cell, seed, "error")
                if on_run_done:
                    on_run_done(cell, seed, "failed")
                continue
            if result.status == "finished":
                summary.finished += 1
                log.info("finished %s seed %d: run %s", cell.cell_id, seed, run_id)
            else:
                summary.failed += 1
                summary.failures.append((cell.cell_id, seed, f"{result.status}: {result.reason}"))
                log.warning("failed %s seed %d: run %s status %s: %s", cell.cell_id, seed, run_id, result.status, result.reason)
            claimer.release(cell, seed, result.status)
            if on_run_done:
                on_run_done(cell, seed, result.status)
    return summary


def _record_error(client, run_id: str, reason: str) -> None:
    client.log_batch(
        run_id, tags=[RunTag(TAG_PREFIX + "status", "error"), RunTag(TAG_PREFIX + "reason", reason[:5000])]
    )
    client.set_terminated(run_id, "FAILED")
