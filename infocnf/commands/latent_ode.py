"""``infocnf latent-ode``: train and test one LatentODE on spirals from a TOML config."""

from __future__ import annotations

import argparse
import logging
import math

__all__ = ["register"]

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "latent-ode",
        help="train a LatentODE on bi-directional spirals",
        description="Train one LatentODE on 2-D spirals with an N(0, I) or a direction-partitioned latent prior, "
        "select the epoch with the lowest validation loss and score it on the test spirals. Writes config.toml, "
        "history.csv, metrics.json, model.pt, trajectories.npz and trajectories.png to the output folder. "
        "Mean squared errors are in squared data units; times and rates use the spiral's time unit, in which "
        "the angle turns 1 rad per unit.",
    )
    parser.add_argument(
        "--config", required=True, metavar="FILE",
        help="TOML config file, for example configs/latent-ode-quick.toml",
    )
    parser.add_argument(
        "--output", required=True, metavar="DIR",
        help="output folder for this run; files already there are overwritten",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, value in TOML syntax (repeatable): --set prior.method=none "
        "--set train.epochs=5 --set solver.rtol=1e-3 (tolerances are unitless; epochs count passes over data.num_train)",
    )
    parser.add_argument(
        "--seed", type=int, metavar="N",
        help="random seed (an integer >= 0) for initialisation, batches and sampling; overrides seed. "
        "The spirals come from data.seed",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..latent_ode import apply_latent_ode_overrides, load_latent_ode_config, plot_trajectories, run_latent_ode
    from ..progress import EpochProgress

    config = load_latent_ode_config(args.config)
    overrides = list(args.overrides)
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    config = apply_latent_ode_overrides(config, overrides)
    callbacks = [] if args.no_progress else [EpochProgress()]
    result = run_latent_ode(config, args.output, callbacks)
    if result.status != "finished":
        log.error("run ended with status %s: %s", result.status, result.reason)
        return 1
    if config.train.trajectory_spirals:
        plot_trajectories({config.prior.method: args.output}, f"{args.output}/trajectories.png")
    m = result.metrics
    summary = (
        f"test MSE window {m['test_mse_window']:.4f}, forward {m['test_mse_forward']:.4f}, "
        f"backward {m['test_mse_backward']:.4f}"
    )
    if not math.isnan(m["test_error"]):
        summary += f", direction error {100 * m['test_error']:.1f} %"
    summary += f", probe error {100 * m['test_probe_error']:.1f} %, {m['elapsed_s']:.0f} s"
    log.info("finished: %s; results in %s", summary, args.output)
    return 0
