"""``infocnf train``: train one run from a TOML config."""

from __future__ import annotations

import argparse
import logging

from ..config import apply_overrides, load_config
from ..progress import EpochProgress
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
        "train",
        help="train one CNF from a config file",
        description="Train one CNF run and write config.toml, metrics.json, history.csv and checkpoints/ "
        "to the output folder. Rerunning with the same folder resumes from its last checkpoint.",
    )
    add_config_option(parser)
    add_output_option(parser, "output folder for this run")
    add_override_option(parser, "--set train.lr=1e-3 --set solver.tolerance.value=1e-4")
    add_seed_option(parser, "random seed for everything (overrides seed)")
    parser.add_argument("--epochs", type=int, help="number of training epochs (overrides train.epochs)")
    parser.add_argument("--batch-size", type=int, help="training batch size in examples (overrides train.batch_size)")
    parser.add_argument("--lr", type=float, help="Adam learning rate (overrides train.lr)")
    parser.add_argument("--device", help="auto, cpu or cuda[:N] (overrides train.device)")
    add_no_resume_option(parser)
    add_no_progress_option(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..train import Trainer

    fields = {"seed": "seed", "epochs": "train.epochs", "batch_size": "train.batch_size", "lr": "train.lr",
              "device": "train.device"}
    config = apply_overrides(load_config(args.config), collect_overrides(args, fields))
    callbacks = [] if args.no_progress else [EpochProgress()]
    result = Trainer(config, args.output, callbacks).fit(resume=not args.no_resume)
    if result.status != "finished":
        log.error("run ended with status %s: %s", result.status, result.reason)
        return 1
    m = result.metrics
    summary = f"test bits/dim {m['test_bits_per_dim']:.4f}"
    if m["test_error"] == m["test_error"]:
        summary += f", test error {100 * m['test_error']:.2f} %"
    summary += f", train NFE forward {m['train_nfe_forward']:.1f}, {format_duration(m['elapsed_s'])}"
    log.info("finished: %s; results in %s", summary, args.output)
    return 0
