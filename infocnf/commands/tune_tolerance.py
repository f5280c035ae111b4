"""``infocnf tune-tolerance``: search per-scale training tolerances with a resumable Optuna study."""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path

from ..config import apply_overrides, load_config
from ._common import (
    add_config_option,
    add_no_progress_option,
    add_output_option,
    add_override_option,
    add_threads_option,
    require_positive_int,
    set_torch_threads,
)

__all__ = ["register"]

log = logging.getLogger(__name__)

_DESCRIPTION = """\
Search the training tolerances of the "manual" strategy. Each Optuna trial trains the config for a
short budget with one log10 tolerance (atol = rtol) per scale of the multiscale flow, or per CNF
block of the MLP flow, and scores it on the validation split at solver.eval_tolerance.

The study is multi-objective: it minimises validation bits/dim and mean forward NFE per training
iteration with Optuna's TPE sampler and keeps the Pareto front. Validation error is recorded and
reported but not optimised. A constrained objective would need the accepted bits/dim loss fixed
before the search. Because the front is stored, a rerun with another --bpd-slack re-picks the
chosen trial without training.

Chosen trial: among Pareto-optimal trials whose validation bits/dim is within --bpd-slack of the
best, the one with the lowest mean forward NFE.

Output folder: tolerance.toml ([solver.tolerance] snippet with strategy = "manual" and per_block),
best_config.toml (the config with those tolerances), trials.csv, trials.md, pareto.png, study.db
(the default storage) and trials/<study>/trial_NNNN/ (one training run per trial). Rerunning the
same command resumes the study: stored trials are kept and only the missing ones run. A trial whose
training fails (solver failure, divergence) is stored as PRUNED with the reason and counts as done.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "tune-tolerance",
        help="search per-scale training tolerances with Optuna",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )

    add_config_option(parser)
    parser.add_argument(
        "--trials", type=int, required=True, metavar="N",
        help="trials the study should contain in total, counting earlier runs (an integer >= 1)",
    )
    add_output_option(parser, "output folder (default: tune-tolerance-<config name>)", required=False)
    parser.add_argument("--storage", default="", help="Optuna storage URL (default: sqlite:///<output>/study.db)")
    parser.add_argument("--study-name", help="Optuna study name (default: the config file name without .toml)")
    parser.add_argument(
        "--epochs", type=int, help="training epochs per trial (default: a tenth of train.epochs, at least 1)"
    )

    parser.add_argument("--log10-min", type=float, help="tightest log10 tolerance sampled (default: -7)")
    parser.add_argument("--log10-max", type=float, help="loosest log10 tolerance sampled (default: -2)")
    parser.add_argument(
        "--bpd-slack",
        type=float,
        help="relative validation bits/dim slack of the chosen trial over the best, 0.01 = 1 %% (default: 0.01)",
    )

    add_override_option(parser, "--set model.hidden_dims=[32,32]")
    add_threads_option(
        parser, "CPU threads for torch (default: torch's choice); 1 is often faster for small models on a busy machine"
    )
    add_no_progress_option(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import optuna
    from tqdm.auto import tqdm

    from ..progress import EpochProgress
    from ..tuning import TuneConfig, tune_tolerance

    # TuneConfig checks these too, but its messages name the fields, not the options.
    require_positive_int("--trials", args.trials, "the total number of trials the study should contain")
    if args.epochs is not None:
        require_positive_int("--epochs", args.epochs, "the training epochs per trial")
    config_path = Path(args.config)
    # Flags left out fall back to the TuneConfig defaults, which the help texts repeat.
    given = {
        name: getattr(args, name)
        for name in ("log10_min", "log10_max", "epochs", "bpd_slack")
        if getattr(args, name) is not None
    }
    tune = TuneConfig(trials=args.trials, study_name=args.study_name or config_path.stem, storage=args.storage, **given)
    set_torch_threads(args.threads)
    config = apply_overrides(load_config(config_path), args.overrides)
    output = Path(args.output or f"tune-tolerance-{config_path.stem}")

    # Optuna's own per-trial lines go through the root logger, so they share its format and
    # print above the progress bars.
    optuna.logging.disable_default_handler()
    optuna.logging.enable_propagation()
    bars: dict[str, tqdm] = {}

    def start_bar(finished: int, remaining: int) -> None:
        if not args.no_progress:
            bars["trials"] = tqdm(total=finished + remaining, initial=finished, desc="trials", unit="trial", dynamic_ncols=True)

    def update_bar(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        bar = bars.get("trials")
        if bar is None:
            return
        if trial.values:
            bar.set_postfix({"val_bpd": f"{trial.values[0]:.4f}", "nfe": f"{trial.values[1]:.1f}"})
        bar.update(1)

    def trainer_bars() -> list[EpochProgress]:
        return [] if args.no_progress else [EpochProgress(position=1, leave=False)]

    try:
        result = tune_tolerance(config, output, tune, [update_bar], trainer_bars, start_bar)
    finally:
        if "trials" in bars:
            bars["trials"].close()

    if result.chosen_trial is None:
        log.error("no trial finished, so no tolerances were chosen; see %s for each failure", result.files["trials_md"])
        return 1
    m = result.metrics
    error = f", val error {100 * m['val_error']:.2f} %" if math.isfinite(m["val_error"]) else ""
    log.info(
        "chose trial %d of %d: per_block = %s (val bits/dim %.4f%s, mean forward NFE %.1f); snippet in %s, table in %s",
        result.chosen_trial,
        result.trials_finished,
        list(result.per_block),
        m["val_bits_per_dim"],
        error,
        m["train_nfe_forward"],
        result.files["snippet"],
        result.files["trials_md"],
    )
    return 0
