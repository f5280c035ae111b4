"""Command line: ``python -m bench [options]`` runs the benchmark and writes RESULTS.md, JSON and a plot."""

from __future__ import annotations

import os

# MLflow 3 sends telemetry on import unless both are set; the harness section imports it.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")

import argparse  # noqa: E402
import logging  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

__all__ = ["main", "build_parser"]

log = logging.getLogger("bench")


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid list {text!r}: expected numbers separated by commas, for example 1e-3,1e-5")


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid list {text!r}: expected integers separated by commas, for example 32,64")


def _sections(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark the CNF training iteration: time, NFE and peak memory per iteration, the "
        "profiled share of vector-field time, the Trainer and MLflow cost, and scaling fits. Writes "
        "RESULTS.md, results.json and results.png to the output folder.",
    )

    # What runs, where, and with how many threads.
    parser.add_argument("--quick", action="store_true", help="tiny sizes for tests and smoke runs: well under a minute, and the numbers mean little")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads for this process (default 1; more than the free cores slows every op)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default auto: the GPU when there is one)")
    parser.add_argument("--sections", type=_sections,
                        help="comma-separated subset of: digits, profile, adjoint, mnist, harness, compile (default: all)")

    # Sizes and repeats of the digits measurements.
    parser.add_argument("--batch-sizes", type=_ints, help="digits batch sizes, for example 32,64,128,256,512")
    parser.add_argument("--tolerances", type=_floats, help="digits atol = rtol values, for example 1e-3,1e-4,1e-5")
    parser.add_argument("--reference-batch", type=int, help="batch size of the cell the targets are judged on (default 64)")
    parser.add_argument("--reference-tolerance", type=float, help="tolerance of that cell (default 1e-5)")
    parser.add_argument("--warmup", type=int, help="untimed iterations before each digits cell's repeats (default 2)")
    parser.add_argument("--repeats", type=int, help="timed iterations per digits cell (default 5)")

    # The MNIST-shaped flow and the harness section.
    parser.add_argument("--mnist-batch-size", type=int, help="batch size of the MNIST-shaped flow (default 8)")
    parser.add_argument("--mnist-tolerances", type=_floats, help="tolerances of the MNIST-shaped flow (default 1e-3)")
    parser.add_argument("--mnist-repeats", type=int, help="timed MNIST-shaped iterations per tolerance (default 2)")
    parser.add_argument("--no-mnist-profile", action="store_true", help="skip the profiled MNIST-shaped iteration")
    parser.add_argument("--harness-epochs", type=int, help="Trainer.fit epochs in the harness section (default 3)")
    parser.add_argument("--harness-iterations", type=int, help="iterations per harness epoch (default 20)")
    parser.add_argument("--no-mlflow", action="store_true", help="run the harness section without the MLflow callback")

    # Output.
    parser.add_argument("--label", default="", help="name of this run, for example the change it measures")
    parser.add_argument("--output-dir", default=str(Path(__file__).resolve().parent),
                        help="folder for RESULTS.md, results.json and results.png (default: the bench package folder)")
    parser.add_argument("--json-only", action="store_true", help="write results.json only")
    parser.add_argument(
        "--render",
        metavar="RESULTS_JSON",
        help="measure nothing: read this results.json and write it to the output folder again as results.json, "
        "RESULTS.md and results.png (after a change to the report's layout)",
    )
    parser.add_argument("--compare", nargs="*", default=[], metavar="RESULTS_JSON",
                        help="earlier results.json files, in order, shown as before/after rows in RESULTS.md")
    return parser


_OPTION_FLAGS = {
    "sections": "sections", "batch_sizes": "batch_sizes", "tolerances": "tolerances",
    "reference_batch": "reference_batch", "reference_tolerance": "reference_tolerance", "warmup": "warmup",
    "repeats": "repeats", "mnist_batch_size": "mnist_batch_size", "mnist_tolerances": "mnist_tolerances",
    "mnist_repeats": "mnist_repeats", "harness_epochs": "harness_epochs", "harness_iterations": "harness_iterations",
}


def _options(args: argparse.Namespace):
    from .suite import BenchOptions, quick_options

    changes = {field: getattr(args, flag) for flag, field in _OPTION_FLAGS.items() if getattr(args, flag) is not None}
    if args.no_mnist_profile:
        changes["mnist_profile"] = False
    if args.no_mlflow:
        changes["mlflow"] = False
    changes["label"] = args.label
    return quick_options(**changes) if args.quick else BenchOptions(**changes)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s bench[{args.label or 'unlabelled'}] %(message)s")
    try:
        from .environment import resolve_device, set_threads
        from .report import load_results, write_results
        from .suite import run_suite

        set_threads(args.threads)
        device = resolve_device(args.device)
        options = _options(args)
        history = [load_results(path) for path in args.compare]
        if args.render:
            results = load_results(args.render)
        else:
            results = run_suite(options, device)
            results["command"] = shlex.join(["python", "-m", "bench", *argv])
        for path in write_results(results, args.output_dir, history, json_only=args.json_only):
            log.info("wrote %s", path)
    except ValueError as exc:
        print(f"python -m bench: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
