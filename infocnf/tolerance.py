"""Tolerance strategies for training solves: fixed, manual per block, and learned by REINFORCE gates."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .config import SolverConfig, ToleranceConfig
from .solve import SolveOptions, SolveStats

__all__ = [
    "make_solve_options",
    "TolerancePlan",
    "FixedPlan",
    "TolerancePolicy",
    "FixedPolicy",
    "ManualPolicy",
    "LearnedPolicy",
    "build_policy",
]


def make_solve_options(solver: SolverConfig, tolerance: float, deadline: float | None = None) -> SolveOptions:
    """Options for one solve at atol = rtol = ``tolerance`` with the run's solver settings."""
    return SolveOptions(
        atol=tolerance,
        rtol=tolerance,
        method=solver.method,
        adjoint=solver.adjoint,
        divergence=solver.divergence,
        probe=solver.probe,
        max_num_steps=solver.max_num_steps,
        step_size=solver.step_size,
        deadline=deadline,
        adaptive=solver.adaptive,
    )


@dataclass
class _Decision:
    block: int
    tolerance: float
    log_prob: torch.Tensor | None = None


@dataclass
class TolerancePlan:
    """Per-iteration plan: maps (block index, block input) to solve options and records each choice."""

    solver: SolverConfig
    deadline: float | None = None
    decisions: list[_Decision] = field(default_factory=list)

    def choose(self, block: int, x: torch.Tensor) -> tuple[float, torch.Tensor | None]:
        """Return the tolerance for this block's solve and the log-probability of choosing it."""
        raise NotImplementedError

    def __call__(self, block: int, x: torch.Tensor) -> SolveOptions:
        tolerance, log_prob = self.choose(block, x)
        self.decisions.append(_Decision(block, tolerance, log_prob))
        return make_solve_options(self.solver, tolerance, self.deadline)

    @property
    def tolerances(self) -> list[float]:
        """Tolerance used by each solve of this plan, in call order."""
        return [d.tolerance for d in self.decisions]


@dataclass
class FixedPlan(TolerancePlan):
    """Every block at one tolerance: the evaluation plan of every strategy."""

    tolerance: float = 1e-5

    def choose(self, block: int, x: torch.Tensor) -> tuple[float, None]:
        return self.tolerance, None


@dataclass
class _ListPlan(TolerancePlan):
    per_block: tuple[float, ...] = ()

    def choose(self, block: int, x: torch.Tensor) -> tuple[float, None]:
        return self.per_block[block], None


class TolerancePolicy(nn.Module):
    """Source of training-time tolerance plans. Evaluation never uses a policy: it solves with FixedPlan."""

    strategy = ""

    def plan(self, solver: SolverConfig, deadline: float | None = None) -> TolerancePlan:
        raise NotImplementedError

    def policy_loss(self, plan: TolerancePlan, stats: list[SolveStats], task_loss: torch.Tensor) -> torch.Tensor | None:
        """Extra loss term for the policy's own parameters; None when it has none."""
        return None

    def mean_plan(self, solver: SolverConfig, deadline: float | None = None) -> TolerancePlan:
        """Deterministic plan at the policy's typical tolerance per block (for reporting)."""
        return self.plan(solver, deadline)


class FixedPolicy(TolerancePolicy):
    """atol = rtol = one value for every block."""

    strategy = "fixed"

    def __init__(self, tolerance: float):
        super().__init__()
        self.tolerance = tolerance

    def plan(self, solver: SolverConfig, deadline: float | None = None) -> TolerancePlan:
        return FixedPlan(solver, deadline, tolerance=self.tolerance)


class ManualPolicy(TolerancePolicy):
    """One tolerance per CNF block, in flow order (from a config or a tolerance search)."""

    strategy = "manual"

    def __init__(self, per_block: tuple[float, ...], num_blocks: int):
        super().__init__()
        if len(per_block) != num_blocks:
            raise ValueError(
                f"invalid solver.tolerance.per_block: {len(per_block)} tolerances for a model with "
                f"{num_blocks} CNF blocks; give exactly one per block, in flow order"
            )
        self.per_block = tuple(per_block)

    def plan(self, solver: SolverConfig, deadline: float | None = None) -> TolerancePlan:
        return _ListPlan(solver, deadline, per_block=self.per_block)


class _FlatGate(nn.Module):
    """Gate for flat inputs (batch, features): a two-layer MLP giving (mean, log-std) per example."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.out = nn.Linear(hidden, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.net(x))  # (batch, 2)


class _ConvGate(nn.Module):
    """Gate for images (batch, channels, height, width): pool, two conv-BN-ReLU, global pool, 1x1 conv."""

    def __init__(self, channels: int, height: int, hidden: int):
        super().__init__()
        pool = nn.AvgPool2d(2) if height >= 4 else nn.Identity()
        # No conv bias before BatchNorm: BN subtracts the batch mean, so such a bias would get
        # a zero gradient and never train.
        self.net = nn.Sequential(
            pool,
            nn.Conv2d(channels, hidden, 3, padding=1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, padding=1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.out = nn.Conv2d(hidden, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.net(x)).flatten(1)  # (batch, 2, 1, 1) -> (batch, 2)


@dataclass
class _LearnedPlan(TolerancePlan):
    policy: LearnedPolicy | None = None
    sample: bool = True

    def choose(self, block: int, x: torch.Tensor) -> tuple[float, torch.Tensor | None]:
        mean, log_std = self.policy.distribution(block, x)
        if not self.sample:
            return 10.0 ** float(mean.detach()), None
        dist = torch.distributions.Normal(mean, log_std.exp())
        action = dist.sample()
        # The clamp is part of the environment: the log-probability is of the sampled action,
        # and the solve uses the clamped value, so no tolerance is ever outside the range.
        log10_tol = float(action.clamp(self.policy.log10_min, self.policy.log10_max))
        return 10.0**log10_tol, dist.log_prob(action)


class LearnedPolicy(TolerancePolicy):
    """One gate per CNF block with a Gaussian policy over log10 tolerance, trained by REINFORCE.

    The gate receives its block's input (detached) and outputs a mean and log-std per example; their
    batch average parameterises one Gaussian, because a batch is solved as one ODE with one
    tolerance. The reward of block i is R_i = -nfe_reward_scale * NFE_i (forward NFE of its
    solve); the return r_i = sum_{j >= i} discount^(j - i) R_j, optionally plus the negative
    detached task loss as a terminal reward. A moving-average baseline per block is subtracted and
    the advantage is detached, so the loss -sum_i A_i log pi(g_i) only trains the gates.
    """

    strategy = "learned"

    def __init__(self, block_shapes: list[tuple[int, ...]], config: ToleranceConfig):
        super().__init__()
        gates = []
        for shape in block_shapes:
            if len(shape) == 1:
                gates.append(_FlatGate(shape[0], config.gate_hidden))
            else:
                gates.append(_ConvGate(shape[0], shape[1], config.gate_hidden))
        self.gates = nn.ModuleList(gates)
        for gate in self.gates:
            # Start every gate at the configured mean and log-std; the inputs still reach the
            # weights through the gradient, which is non-zero from the first step.
            nn.init.normal_(gate.out.weight, std=1e-3)
            nn.init.zeros_(gate.out.bias)
        self.log10_min = config.log10_min
        self.log10_max = config.log10_max
        self.log10_init = config.log10_init
        self.init_log_std = config.init_log_std
        # Logit of the initial mean's position in the range, so a zero gate output gives log10_init.
        fraction = min(max((config.log10_init - config.log10_min) / (config.log10_max - config.log10_min), 1e-3), 1 - 1e-3)
        self._mean_offset = math.log(fraction / (1 - fraction))
        self.config = config
        # Exponential moving average of each block's return, and how many returns it has seen.
        self.register_buffer("baseline", torch.zeros(len(block_shapes), dtype=torch.float64))
        self.register_buffer("baseline_count", torch.zeros(len(block_shapes), dtype=torch.int64))

    def distribution(self, block: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Policy mean (log10 tolerance) and log-std for a block input of shape (batch, ...)."""
        out = self.gates[block](x.detach()).mean(dim=0)  # (2,): batch-averaged
        # A sigmoid keeps the mean inside [log10_min, log10_max]: past the clamp, a looser mean
        # would change no solve, and REINFORCE would push it further without bound.
        span = self.log10_max - self.log10_min
        mean = self.log10_min + span * torch.sigmoid(self._mean_offset + out[0])
        log_std = (self.init_log_std + out[1]).clamp(-5.0, 2.0)
        return mean, log_std

    def plan(self, solver: SolverConfig, deadline: float | None = None) -> TolerancePlan:
        return _LearnedPlan(solver, deadline, policy=self, sample=True)

    def mean_plan(self, solver: SolverConfig, deadline: float | None = None) -> TolerancePlan:
        return _LearnedPlan(solver, deadline, policy=self, sample=False)

    def _baseline_value(self, block: int) -> float:
        # Bias-corrected moving average (as in Adam); 0 before the first return.
        count = int(self.baseline_count[block])
        if count == 0:
            return 0.0
        return float(self.baseline[block]) / (1 - self.config.baseline_momentum**count)

    def policy_loss(self, plan: TolerancePlan, stats: list[SolveStats], task_loss: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        rewards = [-cfg.nfe_reward_scale * s.nfe_forward for s in stats]
        terminal = -cfg.task_reward_weight * float(task_loss.detach())
        returns, running = [0.0] * len(rewards), terminal
        for i in reversed(range(len(rewards))):
            running = rewards[i] + cfg.discount * running
            returns[i] = running
        loss = torch.zeros((), device=self.baseline.device)
        for decision, ret in zip(plan.decisions, returns):
            i = decision.block
            advantage = ret - self._baseline_value(i)  # A plain float, so detached.
            loss = loss - advantage * decision.log_prob
            self.baseline[i] = cfg.baseline_momentum * self.baseline[i] + (1 - cfg.baseline_momentum) * ret
            self.baseline_count[i] += 1
        return cfg.reinforce_weight * loss


def build_policy(config: ToleranceConfig, block_shapes: list[tuple[int, ...]]) -> TolerancePolicy:
    """Build the policy named by ``config.strategy`` for a flow with these block input shapes."""
    if config.strategy == "fixed":
        return FixedPolicy(config.value)
    if config.strategy == "manual":
        return ManualPolicy(config.per_block, len(block_shapes))
    if config.strategy == "learned":
        return LearnedPolicy(block_shapes, config)
    raise ValueError(f"unknown solver.tolerance.strategy {config.strategy!r}: choose fixed, manual or learned")

