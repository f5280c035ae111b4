"""Split one profiled training iteration into vector-field time and solver plus harness overhead."""

from __future__ import annotations

import bisect
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile

from infocnf.solve import FIELD_RANGE, SOLVE_RANGE

from .environment import synchronize
from .workloads import ITERATION_RANGE, PHASE_RANGES

__all__ = ["ProfileSplit", "profile_iteration", "split_events"]

_BACKWARD_PREFIX = "autograd::engine::evaluate_function: "
_US = 1e-6  # torch.profiler reports microseconds.


@dataclass
class ProfileSplit:
    """Where one iteration's host time went, in seconds; the five parts add up to the iteration.

    ``field_forward_s``: time inside the solver's field ranges, that is the field, its
    divergence (a vector-Jacobian product) and the autograd graph they record.
    ``field_backward_s``: the backward nodes those ranges recorded, run by loss.backward().
    ``solver_forward_s`` and ``solver_backward_s``: the rest of each solve (torchdiffeq's
    Runge-Kutta arithmetic, step-size control, interpolation, our dynamics' bookkeeping) and the
    backward nodes it recorded. With the adjoint method the latter is the adjoint's backward solve
    less its field evaluations. ``other_s``: everything else (logit transform, prior and classifier,
    loss, gradient clip, Adam, autograd's scheduling between nodes, Python). ``phases`` splits the
    iteration by its forward, backward and optimizer phases; ``counts`` gives op and node counts,
    which unlike seconds do not depend on the machine's load.
    """

    iteration_s: float
    field_forward_s: float
    field_backward_s: float
    solver_forward_s: float
    solver_backward_s: float
    other_s: float
    phases: dict[str, dict[str, float]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    top_overhead_ops: list[tuple[str, float, int]] = field(default_factory=list)
    # Kernel time of the field's ops on a GPU, None on the CPU.
    field_device_s: float | None = None

    @property
    def overhead_s(self) -> float:
        """Solver plus other time: everything but the field."""
        return self.solver_forward_s + self.solver_backward_s + self.other_s

    @property
    def field_share(self) -> float:
        return (self.field_forward_s + self.field_backward_s) / self.iteration_s

    @property
    def overhead_share(self) -> float:
        return self.overhead_s / self.iteration_s

    def as_dict(self) -> dict:
        out = asdict(self)
        out["overhead_s"] = self.overhead_s
        out["field_share"] = self.field_share
        out["overhead_share"] = self.overhead_share
        return out


def _duration_s(event) -> float:
    return (event.time_range.end - event.time_range.start) * _US


def _has_ancestor(event, predicate: Callable, memo: dict[int, bool]) -> bool:
    """Test whether ``event`` or an enclosing event on the same thread satisfies ``predicate``."""
    chain = []
    node = event
    while node is not None and id(node) not in memo:
        if predicate(node):
            memo[id(node)] = True
            break
        chain.append(node)
        node = node.cpu_parent
    found = memo.get(id(node), False) if node is not None else False
    for item in chain:
        memo[id(item)] = found
    return found


class _RangeIndex:
    """Membership in the named ranges: by ancestry on the ranges' thread, by time on other threads.

    Autograd runs GPU backward work on a thread of its own, whose events have no parent there.
    """

    def __init__(self, events, name: str, thread: int):
        self.name = name
        self.thread = thread
        self.memo: dict[int, bool] = {}
        self.ranges = sorted((e.time_range.start, e.time_range.end) for e in events if e.name == name)
        self.starts = [r[0] for r in self.ranges]

    def __call__(self, event) -> bool:
        if event.thread == self.thread:
            return _has_ancestor(event, lambda e: e.name == self.name, self.memo)
        i = bisect.bisect_right(self.starts, event.time_range.start) - 1
        return i >= 0 and event.time_range.start <= self.ranges[i][1]


def _is_node(event) -> bool:
    return event.fwd_thread > 0 or event.name.startswith(_BACKWARD_PREFIX)


def split_events(events, device_time: bool = False) -> ProfileSplit:
    """Attribute the events of one profiled iteration (torch.profiler FunctionEvents).

    The events must contain exactly one ITERATION_RANGE. Backward nodes are matched to the
    field or the solver by sequence number, which autograd gives each recorded op and passes on
    to the node that differentiates it; the double-backward nodes that the divergence's
    create_graph=True records inside a field range count as the field's too. With
    ``device_time``, the GPU kernel time of the field's ops is summed as well.
    """
    iterations = [e for e in events if e.name == ITERATION_RANGE]
    if len(iterations) != 1:
        raise ValueError(f"expected one {ITERATION_RANGE!r} range in the profile, found {len(iterations)}")
    iteration = iterations[0]
    start, end = iteration.time_range.start, iteration.time_range.end
    inside = [e for e in events if e.time_range.start >= start and e.time_range.end <= end]
    in_field = _RangeIndex(inside, FIELD_RANGE, iteration.thread)
    in_solve = _RangeIndex(inside, SOLVE_RANGE, iteration.thread)

    field_ops, solver_ops = set(), set()
    for event in inside:
        if event.sequence_nr < 0 or _is_node(event):
            continue
        if in_field(event):
            field_ops.add((event.thread, event.sequence_nr))
        elif in_solve(event):
            solver_ops.add((event.thread, event.sequence_nr))

    def node_of(ops: set):
        def test(event) -> bool:
            return event.name.startswith(_BACKWARD_PREFIX) and (event.fwd_thread, event.sequence_nr) in ops

        return test

    is_field_node, is_solver_node = node_of(field_ops), node_of(solver_ops)
    field_node_memo: dict[int, bool] = {}
    solver_node_memo: dict[int, bool] = {}

    def under_field_node(event) -> bool:
        return _has_ancestor(event, lambda e: is_field_node(e) and not in_field(e), field_node_memo)

    def under_solver_node(event) -> bool:
        return _has_ancestor(event, lambda e: is_solver_node(e) and not in_field(e), solver_node_memo)

    def top_level(event, inside_same) -> bool:
        return event.cpu_parent is None or not inside_same(event.cpu_parent)

    field_ranges = [e for e in inside if e.name == FIELD_RANGE and top_level(e, in_field)]
    field_nodes = [e for e in inside if is_field_node(e) and not in_field(e) and top_level(e, under_field_node)]
    solve_ranges = [e for e in inside if e.name == SOLVE_RANGE and top_level(e, in_solve)]
    solver_nodes = [
        e for e in inside
        if is_solver_node(e) and not in_field(e) and not under_field_node(e) and top_level(e, under_solver_node)
    ]
    field_events = field_ranges + field_nodes

    def field_within(outer_events) -> float:
        spans = [(e.time_range.start, e.time_range.end) for e in outer_events]
        total = 0.0
        for event in field_events:
            if any(lo <= event.time_range.start and event.time_range.end <= hi for lo, hi in spans):
                total += _duration_s(event)
        return total

    field_forward = sum(_duration_s(e) for e in field_ranges)
    field_backward = sum(_duration_s(e) for e in field_nodes)
    solver_forward = sum(_duration_s(e) for e in solve_ranges) - field_within(solve_ranges)
    solver_backward = sum(_duration_s(e) for e in solver_nodes) - field_within(solver_nodes)
    iteration_s = _duration_s(iteration)
    other = iteration_s - field_forward - field_backward - solver_forward - solver_backward

    phases = {}
    for phase in (e for e in inside if e.name in PHASE_RANGES):
        field_s = field_within([phase])
        total = _duration_s(phase)
        phases[phase.name.split(".", 1)[1]] = {"total_s": total, "field_s": field_s, "overhead_s": total - field_s}
    accounted = sum(p["total_s"] for p in phases.values())
    phases["between_phases"] = {"total_s": iteration_s - accounted, "field_s": 0.0, "overhead_s": iteration_s - accounted}

    # Self time of the ops outside the field, by name: where the overhead goes.
    self_time: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    ops = [e for e in inside if e.name.startswith("aten::")]
    for event in inside:
        if event is iteration or event.name in PHASE_RANGES or event.name == SOLVE_RANGE:
            continue
        if in_field(event) or under_field_node(event):
            continue
        entry = self_time[event.name]
        entry[0] += event.self_cpu_time_total * _US
        entry[1] += 1
    top = sorted(((name, s, n) for name, (s, n) in self_time.items()), key=lambda item: -item[1])[:10]
    counts = {
        "ops": len(ops),
        "field_ops": sum(1 for e in ops if in_field(e) or under_field_node(e)),
        "backward_nodes": sum(1 for e in inside if e.name.startswith(_BACKWARD_PREFIX)),
        "field_backward_nodes": sum(1 for e in inside if is_field_node(e) and not in_field(e)),
    }

    device_s = sum(e.device_time_total for e in field_events) * _US if device_time else None
    return ProfileSplit(
        iteration_s=iteration_s,
        field_forward_s=field_forward,
        field_backward_s=field_backward,
        solver_forward_s=solver_forward,
        solver_backward_s=solver_backward,
        other_s=other,
        phases=phases,
        counts=counts,
        top_overhead_ops=[(name, round(s, 6), n) for name, s, n in top],
        field_device_s=device_s,
    )


def profile_iteration(step: Callable[[], tuple[int, int]], device: torch.device) -> tuple[ProfileSplit, tuple[int, int]]:
    """Run one iteration under torch.profiler and split it; returns the split and the NFE pair.

    The profiler adds a few microseconds to every op, so the profiled iteration is slower than a
    timed one. The split gives shares of the profiled time, and the timed runs give the seconds.
    """
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    synchronize(device)
    with profile(activities=activities) as prof:
        nfe = step()
        synchronize(device)
    return split_events(prof.events(), device_time=device.type == "cuda"), nfe
