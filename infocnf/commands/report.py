"""``infocnf report``: write Table 1, figures and an index page from an MLflow experiment."""

from __future__ import annotations

import argparse

from ._common import add_tracking_uri_option

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "report",
        help="write Table 1, figures and an index page from the runs of an MLflow experiment",
        description="Read the runs of an experiment back from MLflow and write table1.md/.csv/.tex, "
        "curves.png, learned-tolerance plots, failures.csv, failures_per_cell.csv and index.md into the output "
        "folder. Reading creates no MLflow store: a missing SQLite file is an error.",
    )
    parser.add_argument("--experiment", required=True, help="MLflow experiment name, for example infocnf-digits")
    # --out is the option's earlier name, kept so that existing scripts still run.
    parser.add_argument(
        "--output", "--out", dest="out", metavar="DIR", default="reports/latest",
        help="output folder (default: reports/latest)",
    )
    add_tracking_uri_option(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..report import build_report

    index = build_report(args.experiment, args.out, tracking_uri=args.tracking_uri)
    print(f"report: {index}")
    return 0
