"""Timed repeats after a warm-up, their median and spread, and the peak memory of one iteration."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from .environment import synchronize
from .workloads import StepRecord

__all__ = ["Spread", "MemoryReading", "summarize", "time_iterations", "measure_peak_memory"]


@dataclass(frozen=True)
class Spread:
    """Median, quartiles and range of ``n`` repeated measurements."""

    median: float
    q25: float
    q75: float
    min: float
    max: float
    n: int

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class MemoryReading:
    """Peak bytes allocated during one iteration above those allocated before it, how they were
    measured, and that iteration's NFE."""

    peak_bytes: int
    method: str
    nfe_forward: int
    nfe_backward: int


def summarize(values: list[float]) -> Spread:
    """Summarise repeats by median, interquartile range (linear interpolation) and min/max."""
    if len(values) == 0:
        raise ValueError("cannot summarise an empty list of measurements; use --repeats >= 1")
    arr = np.asarray(values, dtype=float)
    q25, median, q75 = np.quantile(arr, [0.25, 0.5, 0.75])
    return Spread(float(median), float(q25), float(q75), float(arr.min()), float(arr.max()), len(values))


def time_iterations(
    step: Callable[[], tuple[int, int]], device: torch.device, warmup: int, repeats: int
) -> list[StepRecord]:
    """Run ``warmup`` untimed iterations, then time ``repeats`` iterations one by one.

    The device is synchronised before and after each timed iteration, so on a GPU the time
    includes all the kernels the iteration queued. CPU seconds are time.process_time(): all
    threads of this process, which on a GPU includes time spent waiting in a synchronisation.
    """
    if warmup < 0 or repeats < 1:
        raise ValueError(f"invalid warm-up {warmup} or repeats {repeats}: expected warm-up >= 0 and repeats >= 1")
    for _ in range(warmup):
        step()
    records = []
    for _ in range(repeats):
        synchronize(device)
        started, cpu_started = time.perf_counter(), time.process_time()
        nfe_forward, nfe_backward = step()
        synchronize(device)
        records.append(
            StepRecord(time.perf_counter() - started, time.process_time() - cpu_started, nfe_forward, nfe_backward)
        )
    return records


def measure_peak_memory(step: Callable[[], tuple[int, int]], device: torch.device) -> MemoryReading:
    """Run one iteration and return the peak of its tensor allocations above the starting level.

    On a GPU this is torch.cuda.max_memory_allocated() minus the bytes allocated before the
    iteration. On the CPU, where torch keeps no allocation statistics, the iteration runs under
    torch.profiler with profile_memory=True and the peak of the running sum of its allocation
    and free events is taken; the profiler slows that iteration, so it is never one that is timed.
    """
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        nfe = step()
        synchronize(device)
        return MemoryReading(torch.cuda.max_memory_allocated(device) - before, "torch.cuda.max_memory_allocated", *nfe)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        nfe = step()
    # NOTE: kineto_results is not a documented attribute of torch.profiler.profile (torch 2.14).
    # It is the one place where every allocation and free is its own event with a signed size.
    sizes = [
        (event.start_ns(), event.nbytes())
        for event in prof.profiler.kineto_results.events()
        if event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU
    ]
    sizes.sort()
    running, peak = 0, 0
    for _, nbytes in sizes:
        running += nbytes
        peak = max(peak, running)
    return MemoryReading(peak, "torch.profiler CPU allocation events (profile_memory=True)", *nfe)
