"""The benchmark suite: which measurements run, at which sizes, and the results record they fill."""

from __future__ import annotations

import datetime
import logging
import time
from dataclasses import asdict, dataclass, field

import torch

from .compile_check import measure_compile
from .environment import describe_machine, load_average
from .field_cost import measure_field_cost
from .harness import measure_harness
from .profile_split import profile_iteration
from .scaling import fit_line, fit_power_law
from .timing import measure_peak_memory, summarize, time_iterations
from .workloads import TrainingStep, Workload, digits_workload, mnist_workload

__all__ = ["SECTIONS", "BenchOptions", "quick_options", "run_suite", "scaling_fits"]

log = logging.getLogger(__name__)

SECTIONS = ("digits", "profile", "adjoint", "mnist", "harness", "compile")


@dataclass(frozen=True)
class BenchOptions:
    """Sizes and repeats of one benchmark run; the defaults take a few minutes on one CPU thread."""

    sections: tuple[str, ...] = SECTIONS
    batch_sizes: tuple[int, ...] = (32, 64, 128, 256, 512)
    tolerances: tuple[float, ...] = (1e-3, 1e-4, 1e-5)
    # The cell whose profile decides the overhead target: the digits config's batch, tolerance 1e-5.
    reference_batch: int = 64
    reference_tolerance: float = 1e-5
    warmup: int = 2
    repeats: int = 5
    digits_hidden_dims: tuple[int, ...] | None = None
    mnist_batch_size: int = 8
    mnist_tolerances: tuple[float, ...] = (1e-3,)
    mnist_repeats: int = 2
    mnist_shape: tuple[int, int, int] = (1, 28, 28)
    mnist_num_scales: int = 3
    mnist_hidden_dims: tuple[int, ...] = (64, 64, 64)
    mnist_num_blocks: int = 2
    mnist_profile: bool = True
    harness_epochs: int = 3
    harness_iterations: int = 20
    mlflow: bool = True
    label: str = ""
    # Set by quick_options: the sizes are for smoke runs and cannot judge the targets.
    quick: bool = False

    def __post_init__(self) -> None:
        unknown = sorted(set(self.sections) - set(SECTIONS))
        if unknown:
            raise ValueError(f"unknown section {unknown[0]!r}: choose from {', '.join(SECTIONS)}")
        for name in ("batch_sizes", "tolerances", "mnist_tolerances"):
            if not getattr(self, name):
                raise ValueError(f"invalid {name}: the list is empty; give at least one value")
        # (field, its command-line option, smallest allowed value, whether that value is allowed)
        limits = (
            ("batch_sizes", "--batch-sizes", 1, True),
            ("reference_batch", "--reference-batch", 1, True),
            ("mnist_batch_size", "--mnist-batch-size", 1, True),
            ("tolerances", "--tolerances", 0, False),
            ("reference_tolerance", "--reference-tolerance", 0, False),
            ("mnist_tolerances", "--mnist-tolerances", 0, False),
            ("warmup", "--warmup", 0, True),
            ("repeats", "--repeats", 1, True),
            ("mnist_repeats", "--mnist-repeats", 1, True),
        )
        for name, option, low, inclusive in limits:
            value = getattr(self, name)
            values = tuple(value) if isinstance(value, (tuple, list)) else (value,)
            if any(v < low if inclusive else v <= low for v in values):
                rule = f"must be >= {low}" if inclusive else f"must be > {low}"
                if isinstance(value, (tuple, list)):
                    rule = "each value " + rule
                value_text = ",".join(f"{v:g}" for v in values)
                raise ValueError(f"invalid {name} {value_text} ({option}): {rule}")


def quick_options(**changes) -> BenchOptions:
    """Tiny sizes for the tests and a smoke run: seconds, not minutes; the numbers mean little."""
    quick = dict(
        batch_sizes=(8, 16),
        tolerances=(1e-2, 1e-3),
        reference_batch=8,
        reference_tolerance=1e-3,
        warmup=1,
        repeats=2,
        digits_hidden_dims=(16, 16),
        mnist_batch_size=2,
        mnist_tolerances=(1e-2,),
        mnist_repeats=1,
        mnist_shape=(1, 8, 8),
        mnist_num_scales=2,
        mnist_hidden_dims=(8,),
        mnist_num_blocks=1,
        harness_epochs=1,
        harness_iterations=3,
        quick=True,
    )
    quick.update(changes)
    return BenchOptions(**quick)


def _step_cell(workload: Workload, batch_size: int, tolerance: float, device, repeats: int, warmup: int,
               profiled: bool = False) -> dict:
    """Time one cell's iterations, then measure the peak memory of one more, and profile another."""
    step = TrainingStep(workload, batch_size, tolerance, device)
    records = time_iterations(step, device, warmup=warmup, repeats=repeats)
    memory = measure_peak_memory(step, device)
    cell = {
        "batch_size": batch_size,
        "tolerance": tolerance,
        "time_s": summarize([r.elapsed_s for r in records]).as_dict(),
        "cpu_time_s": summarize([r.cpu_s for r in records]).as_dict(),
        "nfe_forward": summarize([r.nfe_forward for r in records]).as_dict(),
        "nfe_backward": summarize([r.nfe_backward for r in records]).as_dict(),
        "peak_memory_bytes": memory.peak_bytes,
        "memory_method": memory.method,
        "load_average": load_average(),
    }
    if profiled:
        split, (nfe_forward, nfe_backward) = profile_iteration(step, device)
        cell["profile"] = {"nfe_forward": nfe_forward, "nfe_backward": nfe_backward, "split": split.as_dict()}
    return cell


def _interleaved_cells(workload: Workload, keys: list[tuple[int, float]], device, warmup: int, repeats: int) -> list[dict]:
    """Time every (batch, tolerance) cell in turns, one iteration per cell per round.

    A burst of load from other processes then slows one iteration of many cells instead of
    every iteration of one cell. Each cell's peak memory is measured on one more iteration.
    """
    steps = [TrainingStep(workload, batch, tolerance, device) for batch, tolerance in keys]
    for (batch, tolerance), step in zip(keys, steps):
        log.info("digits warm-up: batch %d, tolerance %g", batch, tolerance)
        time_iterations(step, device, warmup=warmup, repeats=1)
    records = [[] for _ in steps]
    for round_index in range(repeats):
        log.info("digits timing: round %d of %d over %d cells", round_index + 1, repeats, len(steps))
        for cell_records, step in zip(records, steps):
            cell_records.extend(time_iterations(step, device, warmup=0, repeats=1))
    cells = []
    for (batch, tolerance), step, cell_records in zip(keys, steps, records):
        memory = measure_peak_memory(step, device)
        cells.append({
            "batch_size": batch,
            "tolerance": tolerance,
            "time_s": summarize([r.elapsed_s for r in cell_records]).as_dict(),
            "cpu_time_s": summarize([r.cpu_s for r in cell_records]).as_dict(),
            "nfe_forward": summarize([r.nfe_forward for r in cell_records]).as_dict(),
            "nfe_backward": summarize([r.nfe_backward for r in cell_records]).as_dict(),
            "peak_memory_bytes": memory.peak_bytes,
            "memory_method": memory.method,
            "load_average": load_average(),
        })
    return cells


def _profile_cell(workload: Workload, batch_size: int, tolerance: float, device, warmup: int, repeats: int) -> dict:
    """Estimate the field's share without the profiler, then profile one iteration."""
    step = TrainingStep(workload, batch_size, tolerance, device)
    time_iterations(step, device, warmup=warmup, repeats=1)
    cost = measure_field_cost(step, rounds=repeats)
    split, (nfe_forward, nfe_backward) = profile_iteration(step, device)
    return {
        "batch_size": batch_size,
        "tolerance": tolerance,
        "nfe_forward": nfe_forward,
        "nfe_backward": nfe_backward,
        "split": split.as_dict(),
        "field_cost": cost.as_dict(),
        "load_average": load_average(),
    }


def _adjoint_cell(workload: Workload, batch_size: int, tolerance: float, adjoint: bool, device, warmup: int) -> dict:
    step = TrainingStep(workload, batch_size, tolerance, device, adjoint=adjoint)
    for _ in range(max(warmup, 1)):
        step()
    memory = measure_peak_memory(step, device)
    return {
        "batch_size": batch_size,
        "tolerance": tolerance,
        "adjoint": adjoint,
        "peak_memory_bytes": memory.peak_bytes,
        "memory_method": memory.method,
        "nfe_forward": memory.nfe_forward,
        "nfe_backward": memory.nfe_backward,
        "load_average": load_average(),
    }


def _fits(x: list[float], y: list[float], power: bool = False) -> dict | None:
    if len(set(x)) < 2:
        return None
    out = {"linear": fit_line(x, y).as_dict()}
    if power:
        out["power"] = fit_power_law(x, y).as_dict()
    return out


def scaling_fits(results: dict) -> dict:
    """Fit time against batch size and NFE, and memory against batch size and NFE per adjoint setting."""
    fits: dict = {"time_vs_batch": {}, "time_vs_nfe": {}, "memory_vs_batch": {}, "memory_vs_nfe": {}}
    cells = results.get("digits", {}).get("cells", [])
    # CPU seconds on the CPU, where other processes inflate wall-clock time; wall-clock on a GPU.
    time_key = "cpu_time_s" if results["machine"]["device"] == "cpu" else "time_s"
    fits["time_clock"] = time_key
    for tolerance in sorted({c["tolerance"] for c in cells}):
        rows = [c for c in cells if c["tolerance"] == tolerance]
        fit = _fits([c["batch_size"] for c in rows], [c[time_key]["median"] for c in rows], power=True)
        if fit:
            fits["time_vs_batch"][f"{tolerance:g}"] = fit
    for batch in sorted({c["batch_size"] for c in cells}):
        rows = [c for c in cells if c["batch_size"] == batch]
        nfe = [c["nfe_forward"]["median"] + c["nfe_backward"]["median"] for c in rows]
        fit = _fits(nfe, [c[time_key]["median"] for c in rows])
        if fit:
            fits["time_vs_nfe"][str(batch)] = fit
    adjoint = results.get("adjoint", {})
    for mode in (False, True):
        key = "adjoint" if mode else "backprop"
        by_batch = [c for c in adjoint.get("by_batch", []) if c["adjoint"] == mode]
        fit = _fits([c["batch_size"] for c in by_batch], [c["peak_memory_bytes"] for c in by_batch])
        if fit:
            fits["memory_vs_batch"][key] = fit
        by_tol = [c for c in adjoint.get("by_tolerance", []) if c["adjoint"] == mode]
        fit = _fits([c["nfe_forward"] for c in by_tol], [c["peak_memory_bytes"] for c in by_tol])
        if fit:
            fits["memory_vs_nfe"][key] = fit
    return fits


def run_suite(options: BenchOptions, device: torch.device) -> dict:
    """Run the selected sections and return the results record (plain data, ready for JSON)."""
    results: dict = {
        "label": options.label,
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "settings": asdict(options),
        "machine": describe_machine(device),
        "load_average_start": load_average(),
    }
    started = time.perf_counter()
    needs_digits = {"digits", "profile", "adjoint", "harness", "compile"} & set(options.sections)
    digits = digits_workload(hidden_dims=options.digits_hidden_dims) if needs_digits else None

    if "digits" in options.sections:
        keys = [(batch, tolerance) for tolerance in options.tolerances for batch in options.batch_sizes]
        results["digits"] = {"cells": _interleaved_cells(digits, keys, device, options.warmup, options.repeats)}

    if "profile" in options.sections:
        cells = []
        keys = [(b, options.reference_tolerance) for b in options.batch_sizes]
        keys += [(options.reference_batch, t) for t in options.tolerances if t != options.reference_tolerance]
        if (options.reference_batch, options.reference_tolerance) not in keys:
            keys.insert(0, (options.reference_batch, options.reference_tolerance))
        for batch, tolerance in keys:
            log.info("digits profile: batch %d, tolerance %g", batch, tolerance)
            cells.append(_profile_cell(digits, batch, tolerance, device, options.warmup, options.repeats))
        results["profile"] = {"cells": cells}

    if "adjoint" in options.sections:
        by_batch, by_tolerance = [], []
        for adjoint in (False, True):
            for batch in options.batch_sizes:
                log.info("adjoint memory: adjoint %s, batch %d", adjoint, batch)
                by_batch.append(_adjoint_cell(digits, batch, options.reference_tolerance, adjoint, device, options.warmup))
            for tolerance in options.tolerances:
                log.info("adjoint memory: adjoint %s, tolerance %g", adjoint, tolerance)
                by_tolerance.append(_adjoint_cell(digits, options.reference_batch, tolerance, adjoint, device, options.warmup))
        results["adjoint"] = {"by_batch": by_batch, "by_tolerance": by_tolerance}

    if "mnist" in options.sections:
        mnist = mnist_workload(
            examples=max(64, options.mnist_batch_size),
            shape=options.mnist_shape,
            num_scales=options.mnist_num_scales,
            hidden_dims=options.mnist_hidden_dims,
            num_blocks=options.mnist_num_blocks,
        )
        cells = []
        for tolerance in options.mnist_tolerances:
            log.info("mnist-shaped step: batch %d, tolerance %g", options.mnist_batch_size, tolerance)
            # One warm-up iteration: a full-size iteration takes seconds and GBs.
            cells.append(
                _step_cell(mnist, options.mnist_batch_size, tolerance, device, options.mnist_repeats, 1, options.mnist_profile)
            )
        results["mnist"] = {"shape": list(options.mnist_shape), "num_scales": options.mnist_num_scales, "cells": cells}

    if "harness" in options.sections:
        log.info("harness: %d epochs of %d iterations", options.harness_epochs, options.harness_iterations)
        cost = measure_harness(
            digits,
            options.reference_batch,
            options.reference_tolerance,
            options.harness_epochs,
            options.harness_iterations,
            device,
            mlflow=options.mlflow,
        )
        results["harness"] = {**cost.as_dict(), "load_average": load_average()}

    if "compile" in options.sections:
        log.info("torch.compile of the field: batch %d, tolerance %g", options.reference_batch, options.reference_tolerance)
        compiled = measure_compile(digits, options.reference_batch, options.reference_tolerance, device, options.repeats)
        results["compile"] = {**compiled, "load_average": load_average()}

    results["scaling"] = scaling_fits(results)
    results["elapsed_s"] = time.perf_counter() - started
    results["load_average_end"] = load_average()
    return results
