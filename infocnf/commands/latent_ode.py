"""``infocnf latent-ode``: train and test one LatentODE on spirals from a TOML config."""

from __future__ import annotations

import argparse
import logging
import math

from ._common import (
    add_config_option,
    add_no_progress_option,
    add_no_resume_option,
    add_output_option,
    add_override_option,
    add_seed_option,
    collect_overrides,
    format_duration,
)

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
    add_config_option(parser, "TOML config file, for example configs/latent-ode-quick.toml")
    add_output_option(
        parser,
        "output folder for this run; a run of the same config interrupted there resumes after its last "
        "finished epoch",
    )
    add_override_option(
        parser,
        "--set prior.method=none --set train.epochs=5 --set solver.rtol=1e-3",
        "Tolerances are unitless, and epochs count passes over data.num_train",
    )
    add_seed_option(
        parser,
        "random seed (an integer >= 0) for initialisation, batches and sampling; overrides seed. "
        "The spirals come from data.seed",
    )
    add_no_resume_option(parser)
    add_no_progress_option(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..latent_ode import apply_latent_ode_overrides, load_latent_ode_config, plot_trajectories, run_latent_ode
    from ..progress import EpochProgress

    config = apply_latent_ode_overrides(load_latent_ode_config(args.config), collect_overrides(args, {"seed": "seed"}))
    callbacks = [] if args.no_progress else [EpochProgress()]
    result = run_latent_ode(config, args.output, callbacks, resume=not args.no_resume)
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
    summary += f", probe error {100 * m['test_probe_error']:.1f} %, {format_duration(m['elapsed_s'])}"
    log.info("finished: %s; results in %s", summary, args.output)
    return 0
