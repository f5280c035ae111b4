"""A profiler-free estimate of the field's share: field evaluations timed alone, times the NFE."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from infocnf.divergence import divergence_hutchinson, draw_probe

from .environment import synchronize
from .timing import Spread, summarize
from .workloads import TrainingStep

__all__ = ["FieldCost", "measure_field_cost"]


@dataclass
class FieldCost:
    """Field time per evaluation of each CNF block, timed alone, and the iteration time it explains.

    Each round times one training iteration, then one chain of field evaluations per distinct
    block shape, so that both meet the same load. ``forward_s[i]`` is one evaluation of block
    i's field and its Hutchinson divergence with create_graph=True, as the solver makes it, and
    ``backward_s[i]`` is loss.backward() through one such evaluation (medians over the rounds).
    A round's overhead share is 1 - (sum over blocks of NFE forward x forward seconds + NFE
    backward x backward seconds) / iteration seconds, and ``overhead_share`` is its median.
    Times are CPU seconds on the CPU and wall-clock seconds on a GPU.
    """

    forward_s: list[float]
    backward_s: list[float]
    iteration_s: Spread
    overhead_share: float
    overhead_shares: list[float]
    clock: str = "cpu"

    def as_dict(self) -> dict:
        return asdict(self)


def _clock(device: torch.device):
    return time.process_time if device.type == "cpu" else time.perf_counter


def _chain_time(block_field, shape, batch_size: int, device, evaluations: int) -> tuple[float, float]:
    """Time one chain of ``evaluations``; returns seconds per evaluation, forward and backward."""
    clock = _clock(device)
    generator = torch.Generator().manual_seed(0)
    z0 = torch.randn((batch_size, *shape), generator=generator).to(device)  # (batch, *block shape)
    probe = draw_probe(z0, "rademacher")
    t = torch.tensor(0.5, device=device)
    synchronize(device)
    started = clock()
    z = z0.requires_grad_(True)
    total = torch.zeros(batch_size, device=device)
    for _ in range(evaluations):
        dz = block_field(t, z)
        div = divergence_hutchinson(dz, z, probe, create_graph=True)
        # A small Euler step keeps every evaluation in the graph, as the solver's stages do.
        z = z + 0.01 * dz
        total = total + div
    loss = z.sum() + total.sum()
    synchronize(device)
    middle = clock()
    loss.backward()
    synchronize(device)
    ended = clock()
    block_field.zero_grad(set_to_none=True)
    return (middle - started) / evaluations, (ended - middle) / evaluations


def measure_field_cost(step: TrainingStep, rounds: int = 7, evaluations: int = 20) -> FieldCost:
    """Estimate the overhead share of ``step``'s iteration without the profiler, in paired rounds.

    The chains add one Euler step and one sum per evaluation, so they slightly overstate the
    field's cost, and the overhead share is, if anything, understated.
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
    iterations, shares = [], []
    per_round: dict[tuple, list[tuple[float, float]]] = {shape: [] for shape in first_of_shape}
    for _ in range(rounds):
        synchronize(step.device)
        started = clock()
        step()
        synchronize(step.device)
        iteration_s = clock() - started
        costs = {}
        for shape, block_field in first_of_shape.items():
            costs[shape] = _chain_time(block_field, shape, step.batch_size, step.device, evaluations)
            per_round[shape].append(costs[shape])
        field_s = sum(
            stats.nfe_forward * costs[shape][0] + stats.nfe_backward * costs[shape][1]
            for stats, shape in zip(step.last_stats, shapes)
        )
        iterations.append(iteration_s)
        shares.append(1 - field_s / iteration_s)
    forward = [summarize([c[0] for c in per_round[shape]]).median for shape in shapes]
    backward = [summarize([c[1] for c in per_round[shape]]).median for shape in shapes]
    return FieldCost(
        forward_s=forward,
        backward_s=backward,
        iteration_s=summarize(iterations),
        overhead_share=summarize(shares).median,
        overhead_shares=shares,
        clock="cpu" if step.device.type == "cpu" else "wall",
    )
