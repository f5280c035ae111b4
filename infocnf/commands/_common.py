"""Argument definitions and checks shared by several subcommands."""

from __future__ import annotations

import argparse
import json

__all__ = [
    "add_config_option",
    "add_output_option",
    "add_override_option",
    "add_seed_option",
    "add_threads_option",
    "add_tracking_uri_option",
    "add_no_progress_option",
    "collect_overrides",
    "require_positive_int",
    "set_torch_threads",
    "format_duration",
]

# argparse expands %-formats such as %(default)s in help strings, so every help text given to
# these helpers writes a literal percent sign as %%.
_RUN_CONFIG_HELP = "TOML run config (see configs/ for examples)"
_TRACKING_URI_HELP = (
    "MLflow tracking URI (default: sqlite:///mlflow.db in the working directory; a server's "
    "http://HOST:PORT or a database URI also work)"
)


def add_config_option(parser: argparse.ArgumentParser, help: str = _RUN_CONFIG_HELP, required: bool = True) -> None:
    """Add ``--config FILE``, the TOML config the command reads."""
    parser.add_argument("--config", required=required, metavar="FILE", help=help)


def add_output_option(parser: argparse.ArgumentParser, help: str, required: bool = True) -> None:
    """Add ``--output DIR``, the folder the command writes its results to."""
    parser.add_argument("--output", required=required, metavar="DIR", help=help)


def add_override_option(parser: argparse.ArgumentParser, examples: str, note: str = "") -> None:
    """Add the repeatable ``--set KEY=VALUE`` config override, collected in ``args.overrides``.

    ``examples`` lists one or more ``--set`` flags for this command's config. ``note`` is an
    optional sentence on units or meanings, appended to the help text.
    """
    text = f"override a config field, value in TOML syntax (repeatable), for example {examples}"
    if note:
        text += f". {note}"
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=text)


def add_seed_option(parser: argparse.ArgumentParser, help: str) -> None:
    """Add ``--seed N``, which overrides the config's ``seed`` field."""
    parser.add_argument("--seed", type=int, metavar="N", help=help)


def add_threads_option(parser: argparse.ArgumentParser, help: str, default: int | None = None) -> None:
    """Add ``--threads N``, the number of CPU threads torch may use. ``set_torch_threads`` checks and applies it."""
    parser.add_argument("--threads", type=int, metavar="N", default=default, help=help)


def add_tracking_uri_option(parser: argparse.ArgumentParser, help: str = _TRACKING_URI_HELP) -> None:
    """Add ``--tracking-uri URI``.

    Left out, it is None, which selects the SQLite store mlflow.db in the working directory.
    """
    parser.add_argument("--tracking-uri", metavar="URI", help=help)


def add_no_resume_option(parser: argparse.ArgumentParser) -> None:
    """Add ``--no-resume``, which starts a run over instead of resuming it from its checkpoint."""
    parser.add_argument(
        "--no-resume",
        action="store_true",
        help="start over: delete the checkpoints and results of an earlier run in the output folder first, "
        "instead of resuming from its checkpoint",
    )


def add_no_progress_option(parser: argparse.ArgumentParser, help: str = "hide the progress bars") -> None:
    """Add ``--no-progress``, which hides the tqdm bars."""
    parser.add_argument("--no-progress", action="store_true", help=help)


def collect_overrides(args: argparse.Namespace, fields: dict[str, str]) -> list[str]:
    """Return the ``--set`` overrides followed by one ``KEY=VALUE`` per dedicated option that was given.

    ``fields`` maps an ``args`` attribute (for example ``"batch_size"``) to the config field it
    overrides (``"train.batch_size"``). JSON numbers and strings are valid TOML values, so each
    value is written with ``json.dumps``. Later overrides win, so a dedicated option beats ``--set``.
    """
    overrides = list(args.overrides)
    for attribute, key in fields.items():
        value = getattr(args, attribute)
        if value is not None:
            overrides.append(f"{key}={json.dumps(value)}")
    return overrides


def require_positive_int(option: str, value: int, meaning: str) -> None:
    """Raise ValueError naming the command-line ``option`` unless ``value`` is an integer >= 1."""
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"invalid {option} {value}: expected an integer >= 1, {meaning}")


def set_torch_threads(threads: int | None) -> None:
    """Set torch's CPU thread count from ``--threads``; None keeps torch's default."""
    if threads is None:
        return
    require_positive_int("--threads", threads, "the number of CPU threads torch may use")
    import torch

    torch.set_num_threads(threads)


def format_duration(seconds: float) -> str:
    """Format a wall-clock duration: one decimal under 10 s ("0.4 s"), whole seconds from 10 s on ("42 s")."""
    # Compared after rounding, so 9.96 s prints as "10 s", not "10.0 s".
    if round(seconds, 1) < 10:
        return f"{seconds:.1f} s"
    return f"{seconds:.0f} s"
