"""A profiler-free estimate of the field's share: field evaluations timed alone, times the NFE.

It also measures a lower bound for the overhead. In that iteration every solve is replaced by a
chain of plain Euler steps through the same number of field evaluations, with no step-size
control, Runge-Kutta stages or interpolation. What overhead remains there belongs to the rest of
the iteration (the logit transform, prior, classifier, loss, gradient clip and Adam).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from unittest import mock

import torch

import infocnf.flows
from infocnf.divergence import divergence_hutchinson, draw_probe
from infocnf.solve import SolveResult, SolveStats

from .environment import synchronize
from .timing import Spread, summarize
from .workloads import TrainingStep

__all__ = ["FieldCost", "euler_chain", "measure_field_cost"]


@dataclass
class FieldCost:
    """Field time per evaluation of each CNF block, timed alone, and the iteration time it explains.

    Each round times one training iteration, then one chain of field evaluations per distinct
    block shape, so that both meet the same load. ``forward_s[i]`` is one evaluation of block
    i's field and its Hutchinson divergence with create_graph=True, as the solver makes it, and
    ``backward_s[i]`` is loss.backward() through one such evaluation (medians over the rounds).
    A round's overhead share is 1 - (sum over blocks of NFE forward x forward seconds + NFE
    backward x backward seconds) / iteration seconds, and ``overhead_share`` is its median.
    ``floor_share`` is the same share for an iteration whose solves are Euler chains of the
    same forward NFE (see ``euler_chain``), timed in the same rounds: the overhead that no
    solver can remove. Times are CPU seconds on the CPU and wall-clock seconds on a GPU.
    """

    forward_s: list[float]
    backward_s: list[float]
    iteration_s: Spread
    overhead_share: float
    overhead_shares: list[float]
    clock: str = "cpu"
    floor_iteration_s: Spread | None = None
    floor_share: float | None = None
    floor_shares: list[float] = field(default_factory=list)
    # Accepted plus rejected solver steps of each round's real iteration, summed over the blocks.
    steps: list[int] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def _clock(device: torch.device):
    return time.process_time if device.type == "cpu" else time.perf_counter


def euler_chain(block_field, z: torch.Tensor, t: torch.Tensor, evaluations: int, step: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Take ``evaluations`` Euler steps of size ``step`` through the field at the fixed time ``t``.

    Returns the end state and the summed Hutchinson divergence, of shape (batch,). Every
    evaluation stays in the autograd graph, as a solver's stages do, and nothing else is
    computed per evaluation beyond one multiply-add for the state and one add for the sum.
    """
    probe = draw_probe(z, "rademacher")
    total = torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
    for _ in range(evaluations):
        dz = block_field(t, z)
        div = divergence_hutchinson(dz, z, probe, create_graph=True)
        z = z + step * dz
        total = total + div
    return z, total


def _chain_time(block_field, shape, batch_size: int, device, evaluations: int) -> tuple[float, float]:
    """Time one chain of ``evaluations``; returns seconds per evaluation, forward and backward."""
    clock = _clock(device)
    generator = torch.Generator().manual_seed(0)
    z0 = torch.randn((batch_size, *shape), generator=generator).to(device)  # (batch, *block shape)
    t = torch.tensor(0.5, device=device)
    synchronize(device)
    started = clock()
    # A small step keeps the state bounded over the chain.
    z, total = euler_chain(block_field, z0.requires_grad_(True), t, evaluations, 0.01)
    loss = z.sum() + total.sum()
    synchronize(device)
    middle = clock()
    loss.backward()
    synchronize(device)
    ended = clock()
    block_field.zero_grad(set_to_none=True)
    return (middle - started) / evaluations, (ended - middle) / evaluations


@contextmanager
def _euler_solves(nfe_per_block: list[int]):
    """Replace every CNF block's solve by an Euler chain of that block's forward NFE, in call order."""
    calls = iter(nfe_per_block)

    def solve(field_module, x, options, t1=1.0, reverse=False):
        evaluations = next(calls)
        t = torch.as_tensor(t1, dtype=x.dtype, device=x.device) / 2
        z = x if x.requires_grad else x.detach().requires_grad_(True)
        # Steps of 1 / NFE over the unit interval, backwards when reverse, keep z in range.
        sign = -1.0 if reverse else 1.0
        z, total = euler_chain(field_module, z, t, evaluations, sign / evaluations)
        stats = SolveStats(nfe_forward=evaluations, nfe_backward=evaluations, method="euler chain")
        return SolveResult(z, -sign / evaluations * total, stats)

    with mock.patch.object(infocnf.flows, "solve_cnf", solve):
        yield


def measure_field_cost(step: TrainingStep, rounds: int = 7, evaluations: int = 20, floor: bool = True) -> FieldCost:
    """Estimate the overhead share of ``step``'s iteration without the profiler, in paired rounds.

    The chains add one Euler step and one sum per evaluation, so they slightly overstate the
    field's cost, and the overhead share is, if anything, understated. With ``floor``, each
    round also times one iteration whose solves are Euler chains of the real iteration's
    forward NFE per block. Those iterations train the model too, like any other step.
    """
    if rounds < 1 or evaluations < 1:
        raise ValueError(f"invalid rounds {rounds} or evaluations {evaluations}: both must be >= 1")
    clock = _clock(step.device)
    blocks, shapes = step.model.flow.blocks, [tuple(s) for s in step.model.block_shapes]
    # Blocks of one shape cost the same per evaluation, so the first block of each shape is timed.
    first_of_shape = {shape: blocks[shapes.index(shape)].field for shape in dict.fromkeys(shapes)}
    # One untimed chain per shape and one iteration warm up the allocator and the caches.
    for shape, block_field in first_of_shape.items():
        _chain_time(block_field, shape, step.batch_size, step.device, evaluations)
    step()
    iterations, shares, floor_iterations, floor_shares, steps = [], [], [], [], []
    per_round: dict[tuple, list[tuple[float, float]]] = {shape: [] for shape in first_of_shape}

    def timed_step() -> float:
        synchronize(step.device)
        started = clock()
        step()
        synchronize(step.device)
        return clock() - started

    def field_seconds(costs: dict) -> float:
        return sum(
            stats.nfe_forward * costs[shape][0] + stats.nfe_backward * costs[shape][1]
            for stats, shape in zip(step.last_stats, shapes)
        )

    for _ in range(rounds):
        iteration_s = timed_step()
        real_stats = step.last_stats
        costs = {}
        for shape, block_field in first_of_shape.items():
            costs[shape] = _chain_time(block_field, shape, step.batch_size, step.device, evaluations)
            per_round[shape].append(costs[shape])
        iterations.append(iteration_s)
        shares.append(1 - field_seconds(costs) / iteration_s)
        steps.append(sum(stats.accepted_steps + stats.rejected_steps for stats in real_stats))
        if floor:
            with _euler_solves([stats.nfe_forward for stats in real_stats]):
                floor_s = timed_step()
            floor_iterations.append(floor_s)
            floor_shares.append(1 - field_seconds(costs) / floor_s)
            step.last_stats = real_stats
    forward = [summarize([c[0] for c in per_round[shape]]).median for shape in shapes]
    backward = [summarize([c[1] for c in per_round[shape]]).median for shape in shapes]
    return FieldCost(
        forward_s=forward,
        backward_s=backward,
        iteration_s=summarize(iterations),
        overhead_share=summarize(shares).median,
        overhead_shares=shares,
        clock="cpu" if step.device.type == "cpu" else "wall",
        floor_iteration_s=summarize(floor_iterations) if floor else None,
        floor_share=summarize(floor_shares).median if floor else None,
        floor_shares=floor_shares,
        steps=steps,
    )
