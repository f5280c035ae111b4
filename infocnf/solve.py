"""The CNF solve: state and log-density change through torchdiffeq, with per-solve statistics."""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch import nn
from torch.profiler import record_function
from torchdiffeq import odeint, odeint_adjoint

from .divergence import divergence_exact, divergence_hutchinson, draw_probe

__all__ = ["SolveStats", "SolveError", "SolveResult", "SolveOptions", "solve_cnf", "SOLVE_STATUSES", "FIELD_RANGE", "SOLVE_RANGE"]

# Outcomes of a solve other than "ok"; the grid runner records them per cell.
SOLVE_STATUSES = ("ok", "step_size_underflow", "step_budget_exceeded", "non_finite", "timeout")

# torch.profiler ranges around each evaluation of the field and its divergence, and around each
# whole solve, so that profiled time can be attributed to them (python -m bench does this).
FIELD_RANGE = "infocnf.vector_field"
SOLVE_RANGE = "infocnf.solve"


def _profiled_range(name: str):
    # Opened only while a profiler runs: record_function costs a dispatcher call even without one.
    return record_function(name) if torch.autograd._profiler_enabled() else nullcontext()

VectorField = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class SolveStats:
    """Cost record of one solve. ``nfe_backward`` is filled in once the backward pass has run."""

    nfe_forward: int = 0
    nfe_backward: int = 0
    accepted_steps: int = 0
    rejected_steps: int = 0
    atol: float = math.nan
    rtol: float = math.nan
    method: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


class SolveError(RuntimeError):
    """A failed solve, with a status from ``SOLVE_STATUSES`` and a message saying what to change."""

    def __init__(self, status: str, message: str, stats: SolveStats | None = None):
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message
        self.stats = stats


@dataclass
class SolveResult:
    """End state z(t1) of shape like the input, delta_log_prob of shape (batch,), and stats."""

    z: torch.Tensor
    delta_log_prob: torch.Tensor
    stats: SolveStats


@dataclass(frozen=True)
class SolveOptions:
    """How to solve: torchdiffeq method, tolerances, divergence estimator and limits."""

    atol: float
    rtol: float
    method: str = "dopri5"
    adjoint: bool = False
    divergence: str = "hutchinson"
    probe: str = "rademacher"
    max_num_steps: int = 1000
    step_size: float = 0.05
    # Absolute time.monotonic() after which the solve fails with status "timeout"; None for no limit.
    deadline: float | None = None
    adaptive: bool = True
    extra: dict = field(default_factory=dict)


class _CNFDynamics(nn.Module):
    """Augmented dynamics (z, +divergence) of one solve. Lives only as long as that solve's graph.

    Solving s in [0, 1] with d z/ds = t1 f(s t1, z) is the same ODE as t in [0, t1] and lets the
    gradient reach a learned end time t1 through ordinary autograd. The second state integrates
    +tr(d(dz/ds)/dz), and solve_cnf negates it once at the end instead of at every evaluation.
    The solver's error norms ignore the sign, so the steps are the same.
    """

    def __init__(self, field: nn.Module, t1: torch.Tensor, probe: torch.Tensor | None, stats: SolveStats,
                 options: SolveOptions, sign: float):
        super().__init__()
        self.field = field
        self.t1 = t1
        self.probe = probe
        self.stats = stats
        self.options = options
        self.sign = sign
        # The same for every evaluation, so computed once per solve.
        self.scale = sign * t1
        self.forward_done = False

    def forward(self, s: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]):
        z, _ = state
        if self.forward_done:
            # Calls after the forward solve come from the adjoint's backward solve.
            self.stats.nfe_backward += 1
        else:
            self.stats.nfe_forward += 1
            if self.options.deadline is not None and time.monotonic() > self.options.deadline:
                raise SolveError("timeout", "the solve passed its time limit; raise train.time_limit_s or loosen the tolerance", self.stats)
        needs_graph = torch.is_grad_enabled()
        with torch.enable_grad(), _profiled_range(FIELD_RANGE):
            # Without an outer graph, differentiate with respect to a fresh leaf. A view that
            # torchdiffeq made under no_grad (the adjoint's forward solve of an input that
            # requires grad) reports requires_grad but is not connected to any graph.
            if not (needs_graph and z.requires_grad):
                z = z.detach().requires_grad_(True)
            t = (1.0 - s if self.sign < 0 else s) * self.t1
            dz = self.scale * self.field(t, z)
            if self.options.divergence == "exact":
                div = divergence_exact(dz, z, create_graph=needs_graph)
            else:
                div = divergence_hutchinson(dz, z, self.probe, create_graph=needs_graph)
        if not needs_graph:
            return dz.detach(), div.detach()
        if not self.options.adjoint:
            # Runs once per backward pass through this evaluation. A tensor hook costs less per
            # evaluation than an identity autograd.Function, whose backward is a Python node.
            dz.register_hook(self._count_backward)
        return dz, div

    def _count_backward(self, grad: torch.Tensor) -> None:
        self.stats.nfe_backward += 1


class _AdaptiveCNFDynamics(_CNFDynamics):
    """Dynamics with torchdiffeq's step callbacks, which only adaptive solvers call (and accept)."""

    def callback_accept_step(self, t0, y0, dt):
        self.stats.accepted_steps += 1

    def callback_reject_step(self, t0, y0, dt):
        self.stats.rejected_steps += 1


def _classify_assertion(exc: AssertionError, options: SolveOptions) -> SolveError:
    text = str(exc)
    if "underflow" in text:
        return SolveError(
            "step_size_underflow",
            f"the step size underflowed ({text}); the dynamics are too stiff at atol={options.atol:g}, "
            f"rtol={options.rtol:g}: loosen the tolerance or lower the learning rate",
        )
    if "max_num_steps" in text:
        return SolveError(
            "step_budget_exceeded",
            f"the solve needed more than solver.max_num_steps = {options.max_num_steps} steps at "
            f"atol={options.atol:g}, rtol={options.rtol:g}; raise max_num_steps or loosen the tolerance",
        )
    return SolveError("non_finite", f"the solver failed an internal check: {text}")


def solve_cnf(
    field: nn.Module,
    x: torch.Tensor,
    options: SolveOptions,
    t1: torch.Tensor | float = 1.0,
    reverse: bool = False,
) -> SolveResult:
    """Integrate x from t = 0 to t1 (or back from t1 to 0 when ``reverse``) through ``field``.

    ``field(t, z)`` maps z of shape (batch, ...) to dz/dt of the same shape. Returns the end state
    and delta_log_prob, of shape (batch,): the change of log-density from input to output, which
    is -integral of tr(df/dz) dt forwards (so log p(x) = log p_z(z(t1)) - delta_log_prob) and
    +integral of tr(df/dz) dt in reverse. The Hutchinson probe is drawn once here and held
    for every evaluation of this solve, because redrawing it per evaluation makes NFE explode.
    """
    stats = SolveStats(atol=float(options.atol), rtol=float(options.rtol), method=options.method)
    if not (options.atol > 0 and options.rtol > 0):
        raise ValueError(f"invalid tolerance atol={options.atol!r}, rtol={options.rtol!r}: both must be > 0")
    t1 = torch.as_tensor(t1, dtype=x.dtype, device=x.device)
    probe = draw_probe(x, options.probe) if options.divergence == "hutchinson" else None
    dynamics_type = _AdaptiveCNFDynamics if options.adaptive else _CNFDynamics
    dynamics = dynamics_type(field, t1, probe, stats, options, sign=-1.0 if reverse else 1.0)
    log_p0 = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    s = torch.tensor([0.0, 1.0], dtype=x.dtype, device=x.device)
    solver_options = dict(options.extra)
    if options.adaptive:
        solver_options["max_num_steps"] = options.max_num_steps
    else:
        solver_options["step_size"] = options.step_size
    # atol and rtol go in as plain floats: torchdiffeq rejects tolerance tensors that require grad,
    # so a learned tolerance reaches its gate through REINFORCE, not through the solve.
    kwargs = dict(rtol=float(options.rtol), atol=float(options.atol), method=options.method, options=solver_options)
    try:
        with _profiled_range(SOLVE_RANGE):
            if options.adjoint:
                params = tuple(p for p in dynamics.parameters() if p.requires_grad)
                # A learned end time enters the dynamics as a tensor, not a parameter of the field, so
                # the adjoint computes its gradient only when it is listed here.
                if t1.requires_grad:
                    params = params + (t1,)
                z_path, logp_path = odeint_adjoint(dynamics, (x, log_p0), s, adjoint_params=params, **kwargs)
            else:
                z_path, logp_path = odeint(dynamics, (x, log_p0), s, **kwargs)
    except AssertionError as exc:
        error = _classify_assertion(exc, options)
        error.stats = stats
        raise error from exc
    dynamics.forward_done = True
    # The dynamics integrate +divergence; delta_log_prob is its negative (see _CNFDynamics).
    z, delta_log_prob = z_path[-1], -logp_path[-1]
    # One host-device synchronisation for both checks.
    if not bool(torch.isfinite(z).all() & torch.isfinite(delta_log_prob).all()):
        raise SolveError(
            "non_finite",
            "the state or log-density became NaN or infinite; lower the learning rate or tighten the gradient clip",
            stats,
        )
    return SolveResult(z, delta_log_prob, stats)
