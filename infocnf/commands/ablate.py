"""``infocnf ablate``: run an ablation grid file, tracked in MLflow."""

from __future__ import annotations

import argparse
import logging
import os

from ._common import add_no_progress_option, add_tracking_uri_option

__all__ = ["register"]

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "ablate",
        help="run an ablation grid (conditioning x tolerance x batch x lr x seeds)",
        description="Validate a grid file, print the plan, then train every cell x seed not yet finished, "
        "logging each as one MLflow run. Rerunning the same command skips finished runs and resumes "
        "interrupted ones from their checkpoints.",
    )
    parser.add_argument("grid", help="TOML grid file, for example ablations/digits.toml")
    add_tracking_uri_option(parser)
    parser.add_argument("--experiment", help="MLflow experiment name (default: the grid's [grid] experiment)")
    parser.add_argument("--runs-dir", default="runs", help="folder for checkpoints and run files (default: runs)")
    parser.add_argument("--retry-failed", action="store_true", help="rerun cells whose runs failed earlier")
    parser.add_argument("--dry-run", action="store_true", help="validate and print the plan, run nothing")
    parser.add_argument("--report", metavar="DIR", help="write the report into DIR when the grid is done")
    add_no_progress_option(parser)
    shared = parser.add_argument_group(
        "several workers", "Start the same command on every worker: each claims runs from a queue in --storage."
    )
    shared.add_argument(
        "--storage",
        metavar="URL",
        help="Optuna storage that shares the grid among workers: sqlite:///PATH or journal:PATH for processes "
        "on one machine, postgresql://USER:PASSWORD@HOST:PORT/DATABASE or mysql://... for several machines",
    )
    shared.add_argument(
        "--study",
        help="Optuna study that holds the queue (default: the grid name and a hash of its runs); a new name "
        "queues the grid again, for example with --retry-failed",
    )
    shared.add_argument("--heartbeat-interval", type=int, default=60, metavar="SECONDS",
                        help="seconds between heartbeats of a running cell in an RDB storage (default: 60)")
    shared.add_argument("--grace-period", type=int, default=300, metavar="SECONDS",
                        help="seconds without a heartbeat after which another worker takes over the cell (default: 300)")
    shared.add_argument("--no-wait", action="store_true",
                        help="leave when no cell is queued, instead of waiting to take over cells of workers that die")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..distributed import launched_by_torchrun
    from ..grid import load_grid

    grid = load_grid(args.grid)
    experiment = args.experiment or grid.experiment
    # Under torchrun every rank runs this command: rank 0 prints, claims runs and logs them.
    if launched_by_torchrun() and os.environ.get("RANK", "0") != "0" and not args.dry_run:
        from ..distributed import run_grid_data_parallel

        run_grid_data_parallel(grid, tracking_uri=args.tracking_uri, experiment=experiment, runs_dir=args.runs_dir)
        return 0
    print(f"grid {grid.name} ({grid.path}): {len(grid.cells)} cells x {len(grid.seeds)} seeds = {grid.num_runs} runs")
    for factor in grid.factors:
        print(f"  {factor.name}: {', '.join(level.name for level in factor.levels)}")
    print(f"  seeds: {', '.join(str(s) for s in grid.seeds)}")
    print(f"  experiment: {experiment}")
    if args.dry_run:
        for cell in grid.cells:
            print(f"  cell {cell.cell_id}")
        return 0

    from ..distributed import run_grid_data_parallel
    from ..runner import run_grid

    claimer = None
    if args.storage:
        from ..claims import OptunaClaimer
        from ..work_queue import open_shared_tracking

        open_shared_tracking(args.tracking_uri, experiment)
        claimer = OptunaClaimer(
            args.storage,
            study_name=args.study,
            heartbeat_interval_s=args.heartbeat_interval,
            grace_period_s=args.grace_period,
            wait_for_running=not args.no_wait,
        )
    elif args.study:
        raise ValueError(f"--study {args.study} names a study in an Optuna storage; pass --storage URL too")

    make_callbacks, on_done, bar = None, None, None
    if not args.no_progress:
        from tqdm.auto import tqdm

        from ..progress import EpochProgress

        # With --storage this worker runs a share of the grid of unknown size.
        total = None if claimer else grid.num_runs
        bar = tqdm(total=total, desc="runs", unit="run", position=0, dynamic_ncols=True)

        def make_callbacks(cell, seed):
            bar.set_postfix_str(f"{cell.cell_id} seed={seed}")
            return [EpochProgress(position=1, leave=False)]

        def on_done(cell, seed, outcome):
            bar.update(1)

    try:
        # Under torchrun each run trains data-parallel over all ranks.
        summary = (run_grid_data_parallel if launched_by_torchrun() else run_grid)(
            grid,
            tracking_uri=args.tracking_uri,
            experiment=experiment,
            runs_dir=args.runs_dir,
            retry_failed=args.retry_failed,
            make_callbacks=make_callbacks,
            on_run_done=on_done,
            claimer=claimer,
        )
    finally:
        if bar is not None:
            bar.close()
    skipped = f"{summary.skipped} skipped (already done)"
    if summary.skipped_failed:
        skipped = (
            f"{summary.skipped} skipped (already done: {summary.skipped - summary.skipped_failed} finished, "
            f"{summary.skipped_failed} failed earlier, which --retry-failed reruns)"
        )
    print(
        f"grid {grid.name}: {summary.finished} finished, {summary.failed} failed, {skipped}, "
        f"{summary.resumed} resumed; MLflow experiment {experiment!r} at {summary.tracking_uri}"
    )
    for cell_id, seed, reason in summary.failures:
        print(f"  FAILED {cell_id} seed={seed}: {reason.splitlines()[0]}")
    if args.report:
        from ..report import build_report

        index = build_report(experiment, args.report, tracking_uri=summary.tracking_uri)
        print(f"report: {index}")
    return 0
