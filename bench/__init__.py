"""Benchmarks of the CNF training iteration: time, NFE, memory, profile split, harness cost, scaling."""

from .environment import describe_machine, load_average, resolve_device, set_threads
from .harness import HarnessCost, measure_harness
from .profile_split import ProfileSplit, profile_iteration, split_events
from .report import load_results, render_markdown, write_results
from .scaling import LineFit, fit_line, fit_power_law
from .suite import SECTIONS, BenchOptions, quick_options, run_suite, scaling_fits
from .targets import evaluate_targets
from .timing import MemoryReading, Spread, measure_peak_memory, summarize, time_iterations
from .workloads import StepRecord, TrainingStep, Workload, digits_workload, mnist_workload

__all__ = [
    "SECTIONS",
    "BenchOptions",
    "HarnessCost",
    "LineFit",
    "MemoryReading",
    "ProfileSplit",
    "Spread",
    "StepRecord",
    "TrainingStep",
    "Workload",
    "describe_machine",
    "digits_workload",
    "evaluate_targets",
    "fit_line",
    "fit_power_law",
    "load_average",
    "load_results",
    "measure_harness",
    "measure_peak_memory",
    "mnist_workload",
    "profile_iteration",
    "quick_options",
    "render_markdown",
    "resolve_device",
    "run_suite",
    "scaling_fits",
    "set_threads",
    "split_events",
    "summarize",
    "time_iterations",
    "write_results",
]
