"""``infocnf density-check``: train a flow on a Gaussian mixture and check that its density integrates to one."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from ..density_check import (
    DensityCheckConfig,
    apply_density_check_overrides,
    load_density_check_config,
    save_density_check_config,
)
from ._common import (
    add_config_option,
    add_no_progress_option,
    add_output_option,
    add_override_option,
    add_threads_option,
    add_tracking_uri_option,
    format_duration,
    set_torch_threads,
)

__all__ = ["register"]

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "density-check",
        help="check that a trained flow's density integrates to one at each solver tolerance",
        description="Train (or load) a CNF on a 1-D or 2-D Gaussian mixture, then at each tolerance "
        "integrate its density p(x), or p(x | component) for a conditional model, on a grid over the "
        "configured box and report |∫p - 1| and the NFE. Writes config.toml, model.pt, density_sweep.csv, "
        "density_sweep.md (table and verdict) and density_sweep.png (log-log plot) to the output folder. "
        "Without --config it runs the reference setting: three 1-D Gaussians with means -2.8, -0.9 and "
        "2.0, variance 0.4, equal weights, tolerances 1e-1 to 1e-8, threshold 1e-3 on |∫p - 1|.",
    )
    add_config_option(
        parser,
        "TOML density-check config (configs/density-check-1d.toml, configs/density-check-2d.toml); "
        "default: the reference 1-D setting",
        required=False,
    )
    add_output_option(
        parser,
        "output folder; a model.pt there trained with the same settings is reused instead of retrained "
        "(default: runs/density-check/<config file name>, or runs/density-check/reference without --config)",
        required=False,
    )
    add_override_option(
        parser,
        "--set sweep.threshold=1e-4 --set 'sweep.tolerances=[1e-3, 1e-5, 1e-8]' --set conditioning.method=ccnf",
        "Each tolerance sets atol = rtol of a solve, and sweep.threshold bounds |∫p - 1|, a unitless number. "
        "sweep.low and sweep.high are in data units, sweep.points counts grid points per axis, and "
        "train.iterations counts Adam steps",
    )
    add_threads_option(
        parser,
        "CPU threads torch may use (default 1: these small networks gain little from more, and extra "
        "threads slow down sharply when other processes share the cores)",
        default=1,
    )
    add_tracking_uri_option(
        parser,
        "MLflow tracking URI to record the check in, as experiment infocnf-density-check (default: "
        "sqlite:///mlflow.db in the working directory, the store `infocnf ablate` uses)",
    )
    parser.add_argument("--no-tracking", action="store_true", help="do not record the check in MLflow")
    add_no_progress_option(parser, "hide the training progress bar")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from ..density_check import load_or_train_density_model, sweep_tolerances, write_sweep_outputs

    set_torch_threads(args.threads)
    config = load_density_check_config(args.config) if args.config else DensityCheckConfig()
    config = apply_density_check_overrides(config, args.overrides)
    name = Path(args.config).stem if args.config else "reference"
    output = Path(args.output) if args.output else Path("runs") / "density-check" / name
    output.mkdir(parents=True, exist_ok=True)

    start = time.monotonic()
    checkpoint = output / "model.pt"
    # A checkpoint that is reused needs no training bar.
    show_bar = not args.no_progress and not checkpoint.is_file()
    bar = tqdm(total=config.train.iterations, desc="training", unit="it", dynamic_ncols=True) if show_bar else None

    def on_iteration(iteration: int, loss: float) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")

    try:
        model = load_or_train_density_model(config, checkpoint, None if bar is None else on_iteration)
    finally:
        if bar is not None:
            bar.close()
    train_elapsed_s = time.monotonic() - start
    # Written only now, so that a rejected checkpoint leaves the folder's config.toml matching its model.
    save_density_check_config(config, output / "config.toml")

    means = [mean[0] for mean in config.mixture.means] if config.mixture.dim == 1 else []
    table = sweep_tolerances(model, config.sweep, quad_breakpoints=means)
    sweep_elapsed_s = time.monotonic() - start - train_elapsed_s
    title = f"{config.mixture.dim}-D mixture, conditioning {config.conditioning.method}"
    paths = write_sweep_outputs(table, output, config.sweep.threshold, title)
    print(paths["markdown"].read_text())
    if not args.no_tracking:
        from ..density_check.tracking import log_density_check

        log_density_check(config, table, paths, args.tracking_uri, run_name=name)
    log.info("training or loading %s, sweep %s; wrote %s", format_duration(train_elapsed_s),
             format_duration(sweep_elapsed_s), ", ".join(str(p) for p in paths.values()))
    return 0
