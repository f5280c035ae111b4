"""``infocnf status``: show the progress of grids shared among workers through an Optuna storage."""

from __future__ import annotations

import argparse
import logging
from datetime import datetime, timezone

__all__ = ["register"]

log = logging.getLogger(__name__)

_STATES = ("done", "running", "failed", "pending")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "status",
        help="show the progress of grids run by several workers (infocnf ablate --storage)",
        description="For each grid queued in an Optuna storage, count the runs done, running, failed and "
        "pending, and list who runs which cell since when, and why failed runs failed.",
    )
    parser.add_argument("--storage", required=True, metavar="URL",
                        help="the Optuna storage the workers were given (infocnf ablate --storage URL)")
    parser.add_argument("--grid", metavar="NAME", help="show only the grid with this name ([grid] name)")
    parser.set_defaults(handler=run)


def _age(since: str) -> str:
    try:
        seconds = (datetime.now(timezone.utc) - datetime.fromisoformat(since)).total_seconds()
    except ValueError:
        return "?"
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


def run(args: argparse.Namespace) -> int:
    from ..work_queue import hide_password, read_progress

    grids = read_progress(args.storage, args.grid)
    if not grids:
        which = f"grid {args.grid!r}" if args.grid else "grid"
        raise ValueError(
            f"no {which} is queued in {hide_password(args.storage)}; start one with "
            f"`infocnf ablate GRID --storage URL`"
        )
    for grid in grids:
        counts = ", ".join(f"{grid.count(state)} {state}" for state in _STATES)
        print(f"grid {grid.grid} (study {grid.study}): {grid.total} runs: {counts}")
        for run_progress in grid.runs:
            if run_progress.state == "running":
                print(f"  running  {run_progress.cell_id} seed={run_progress.seed}  worker {run_progress.worker}  "
                      f"since {run_progress.since} ({_age(run_progress.since)} ago), attempt {run_progress.attempts}")
        for run_progress in grid.runs:
            if run_progress.state == "failed":
                print(f"  failed   {run_progress.cell_id} seed={run_progress.seed}: {run_progress.outcome}")
    return 0
