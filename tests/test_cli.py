"""Tests of the command line set-up: subcommand discovery, shared options and logging around progress bars."""

import argparse
import logging
import sys
from pathlib import Path

import pytest
from tqdm import tqdm

from infocnf.cli import build_parser, main
from infocnf.commands import _common, status
from infocnf.progress import logging_above_bars


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def test_cli_registers_public_command_modules_only():
    assert set(_subparsers(build_parser())) == {
        "ablate", "density-check", "latent-ode", "report", "status", "train", "tune-tolerance",
    }


@pytest.mark.parametrize(
    "command,required,example",
    [
        ("train", ["--config", "c.toml", "--output", "out"], "--set train.lr=1e-3"),
        ("latent-ode", ["--config", "c.toml", "--output", "out"], "--set prior.method=none"),
        ("density-check", [], "--set sweep.threshold=1e-4"),
        ("tune-tolerance", ["--config", "c.toml", "--trials", "2"], "--set model.hidden_dims=[32,32]"),
    ],
)
def test_cli_set_option_shared(command, required, example):
    parser = build_parser()
    args = parser.parse_args([command, *required, "--set", "a.b=1", "--set", "c='x'"])
    assert args.overrides == ["a.b=1", "c='x'"]
    # argparse wraps help text at spaces, so compare without line breaks.
    help_text = " ".join(_subparsers(parser)[command].format_help().split())
    assert "--set KEY=VALUE" in help_text
    assert example in help_text


def test_cli_collect_overrides_appends_options_after_set():
    args = build_parser().parse_args(
        ["train", "--config", "c.toml", "--output", "out", "--set", "train.lr=1e-2", "--seed", "3", "--lr", "0.001",
         "--device", "cuda:0"]
    )
    fields = {"seed": "seed", "epochs": "train.epochs", "lr": "train.lr", "device": "train.device"}
    assert _common.collect_overrides(args, fields) == [
        "train.lr=1e-2", "seed=3", "train.lr=0.001", 'train.device="cuda:0"',
    ]


@pytest.mark.parametrize(
    "seconds,text",
    [(0.0, "0.0 s"), (0.44, "0.4 s"), (9.94, "9.9 s"), (9.96, "10 s"), (10.0, "10 s"), (42.4, "42 s")],
)
def test_format_duration_decimal_below_ten_seconds(seconds, text):
    assert _common.format_duration(seconds) == text


def test_require_positive_int_names_option():
    _common.require_positive_int("--trials", 1, "the trial count")
    with pytest.raises(ValueError, match=r"^invalid --trials 0: expected an integer >= 1, the trial count$"):
        _common.require_positive_int("--trials", 0, "the trial count")


def test_cli_log_lines_print_above_bars(monkeypatch, capsys, caplog):
    def run_with_bar(args):
        bar = tqdm(total=3, desc="bar", file=sys.stderr)
        bar.update(1)
        logging.getLogger("infocnf.test").info("between updates")
        bar.update(2)
        bar.close()
        return 0

    # register() reads status.run when build_parser runs, so the patch must come first.
    monkeypatch.setattr(status, "run", run_with_bar)
    caplog.set_level(logging.INFO)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(console)
    try:
        code = main(["status", "--storage", "sqlite:///unused.db"])
        handlers_after = list(root.handlers)
    finally:
        root.removeHandler(console)
    assert code == 0
    err = capsys.readouterr().err
    line = next(line for line in err.split("\n") if "between updates" in line)
    # tqdm.write clears the bar with a carriage return before the line, so the bar's text is not in front.
    assert line.split("\r")[-1] == "INFO between updates"
    # The console handler is back once the command returns.
    assert console in handlers_after


def test_logging_above_bars_without_console_handler():
    root = logging.getLogger()
    assert not any(
        isinstance(h, logging.StreamHandler) and h.stream in (sys.stdout, sys.stderr) for h in root.handlers
    )
    before = list(root.handlers)
    with logging_above_bars():
        assert root.handlers == before
    assert root.handlers == before


@pytest.mark.parametrize("flag", ["--output", "--out"])
def test_report_output_option_and_alias(flag):
    args = build_parser().parse_args(["report", "--experiment", "exp", flag, "folder"])
    assert args.out == "folder"


def test_report_output_default():
    assert build_parser().parse_args(["report", "--experiment", "exp"]).out == "reports/latest"


def _interrupt(self, resume=True):
    raise KeyboardInterrupt


@pytest.mark.parametrize("extra, hint", [([], "rerun the same command to resume"),
                                         (["--no-resume"], "rerun without --no-resume to resume")])
def test_cli_interrupt_hint(monkeypatch, tmp_path, capsys, extra, hint):
    from infocnf.train import Trainer

    monkeypatch.setattr(Trainer, "fit", _interrupt)
    config = Path(__file__).resolve().parent.parent / "configs" / "digits-ccnf.toml"
    argv = ["train", "--config", str(config), "--output", str(tmp_path / "run"), "--no-progress", *extra]
    assert main(argv) == 130
    assert hint in capsys.readouterr().err
