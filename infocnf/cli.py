"""The ``infocnf`` command line: one subcommand per module in infocnf.commands."""

from __future__ import annotations

import os

# MLflow 3 sends telemetry on import unless both are set; set them before anything imports it.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
# Reports download artifacts one by one; a progress bar per file is noise.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

import argparse  # noqa: E402
import importlib  # noqa: E402
import logging  # noqa: E402
import pkgutil  # noqa: E402
import sys  # noqa: E402

__all__ = ["main", "build_parser"]


def _command_modules() -> list[str]:
    # Every public module in infocnf.commands defines register(subparsers) for one subcommand.
    # Private modules (names with a leading underscore) contain helpers shared by the commands.
    from . import commands

    return sorted(info.name for info in pkgutil.iter_modules(commands.__path__) if not info.name.startswith("_"))


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="infocnf",
        description="Train and compare conditional continuous normalizing flows (CNF, CCNF, InfoCNF).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _command_modules():
        importlib.import_module(f"infocnf.commands.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    from .progress import logging_above_bars

    try:
        # Log lines print above the commands' progress bars instead of inside them.
        with logging_above_bars():
            return int(args.handler(args) or 0)
    except ValueError as exc:
        print(f"infocnf {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # The same command with --no-resume would start over again, so the hint drops that flag.
        rerun = "rerun without --no-resume" if getattr(args, "no_resume", False) else "rerun the same command"
        print(f"infocnf {args.command}: interrupted; finished results are kept, {rerun} to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
