"""Tests of solve_cnf against closed-form linear ODEs, its statistics, failures and gradients."""

import math
import time

import pytest
import torch
from torch import nn

from infocnf.fields import MLPField
from infocnf.flows import CNFBlock
from infocnf.solve import SolveError, SolveOptions, solve_cnf


class LinearField(nn.Module):
    """f(t, z) = A z for z of shape (batch, features): z(t) = expm(t A) z0 and tr(df/dz) = tr(A)."""

    def __init__(self, matrix: torch.Tensor):
        super().__init__()
        self.matrix = nn.Parameter(matrix.clone())

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return z @ self.matrix.T


class SquareField(nn.Module):
    """f(t, z) = z^2: from z0 > 0 the solution z0 / (1 - z0 t) blows up at t = 1 / z0."""

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return z.pow(2)


class DecayField(nn.Module):
    """f(t, z) = -rate z: stiff for a large rate, so an explicit solver needs many small steps."""

    def __init__(self, rate: float):
        super().__init__()
        self.rate = rate

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return -self.rate * z


def exact_options(tol: float, **kwargs) -> SolveOptions:
    return SolveOptions(atol=tol, rtol=tol, divergence="exact", **kwargs)


@pytest.fixture
def linear_problem():
    generator = torch.Generator().manual_seed(1)
    matrix = 0.5 * torch.randn(3, 3, generator=generator, dtype=torch.float64)
    x = torch.randn(5, 3, generator=generator, dtype=torch.float64)
    return matrix, x


@pytest.mark.parametrize("t1", [1.0, 0.7])
def test_solve_linear_delta_log_prob_exact(linear_problem, t1):
    matrix, x = linear_problem
    result = solve_cnf(LinearField(matrix), x, exact_options(1e-3), t1=t1)
    expected = torch.full((5,), -t1 * float(torch.trace(matrix)), dtype=torch.float64)
    # The trace is constant in time, so every Runge-Kutta rule integrates it exactly: only
    # float64 rounding remains, whatever the tolerance.
    torch.testing.assert_close(result.delta_log_prob, expected, rtol=0, atol=1e-12)


def test_solve_linear_state_matrix_exponential(linear_problem):
    matrix, x = linear_problem
    t1 = 0.7
    result = solve_cnf(LinearField(matrix), x, exact_options(1e-9), t1=t1)
    expected = x @ torch.linalg.matrix_exp(t1 * matrix).T
    # Global error of dopri5 at atol = rtol = 1e-9 on this problem is about 1.5e-9.
    torch.testing.assert_close(result.z, expected, rtol=0, atol=1e-8)


def test_solve_error_shrinks_with_tolerance(linear_problem):
    matrix, x = linear_problem
    expected = x @ torch.linalg.matrix_exp(matrix).T
    nfe, errors = [], []
    for tol in (1e-3, 1e-6, 1e-9):
        result = solve_cnf(LinearField(matrix), x, exact_options(tol))
        nfe.append(result.stats.nfe_forward)
        errors.append(float((result.z.detach() - expected).abs().max()))
    assert nfe[0] < nfe[1] < nfe[2], nfe
    assert errors[0] > errors[1] > errors[2], errors


def test_solve_nfe_grows_as_tolerance_tightens():
    torch.manual_seed(0)
    field = MLPField(2, (16,))
    x = torch.randn(8, 2)
    options = [SolveOptions(atol=tol, rtol=tol) for tol in (1e-2, 1e-4, 1e-6, 1e-8)]
    nfe = [solve_cnf(field, x, opt, t1=10.0).stats.nfe_forward for opt in options]
    assert nfe == sorted(nfe), nfe
    assert nfe[0] < nfe[-1], nfe


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_solve_hutchinson_averages_to_trace(linear_problem, probe):
    matrix, _ = linear_problem
    torch.manual_seed(0)
    x = torch.randn(10_000, 3, dtype=torch.float64)
    options = SolveOptions(atol=1e-3, rtol=1e-3, divergence="hutchinson", probe=probe)
    with torch.no_grad():
        delta = solve_cnf(LinearField(matrix), x, options).delta_log_prob
    # Each example has its own probe e, so -delta = e^T A e is an unbiased draw of tr(A);
    # the batch mean must lie within 5 standard errors of it.
    standard_error = float(delta.std()) / math.sqrt(delta.numel())
    assert abs(float(delta.mean()) + float(torch.trace(matrix))) < 5 * standard_error


def test_solve_rademacher_exact_for_diagonal_field():
    matrix = torch.diag(torch.tensor([0.3, -1.2, 0.8], dtype=torch.float64))
    x = torch.randn(64, 3, dtype=torch.float64)
    options = SolveOptions(atol=1e-5, rtol=1e-5, divergence="hutchinson", probe="rademacher")
    delta = solve_cnf(LinearField(matrix), x, options).delta_log_prob
    # e_i^2 = 1 for a Rademacher probe, so e^T A e = tr(A) for diagonal A. This holds for the
    # whole solve only if one probe is held fixed during it.
    expected = torch.full((64,), -float(torch.trace(matrix)), dtype=torch.float64)
    torch.testing.assert_close(delta, expected, rtol=0, atol=1e-12)


def test_solve_stats_counts(linear_problem):
    matrix, x = linear_problem
    field = LinearField(matrix)
    result = solve_cnf(field, x, exact_options(1e-6))
    stats = result.stats
    assert stats.nfe_forward > 0
    assert stats.accepted_steps > 0
    assert stats.nfe_backward == 0
    assert (stats.atol, stats.rtol, stats.method) == (1e-6, 1e-6, "dopri5")
    # torchdiffeq 0.2.5 dopri5: 2 evaluations to choose the first step, then 6 per attempted
    # step (the seventh stage is reused as the next step's first).
    assert stats.nfe_forward == 2 + 6 * (stats.accepted_steps + stats.rejected_steps)

    (result.z.sum() + result.delta_log_prob.sum()).backward()
    assert 0 < stats.nfe_backward <= stats.nfe_forward


def test_solve_stats_belong_to_one_solve(linear_problem):
    matrix, x = linear_problem
    field = LinearField(matrix)
    first = solve_cnf(field, x, exact_options(1e-6)).stats
    second = solve_cnf(field, x, exact_options(1e-6)).stats
    assert second.nfe_forward == first.nfe_forward
    assert second is not first


def test_solve_adjoint_stats_count_backward(linear_problem):
    matrix, x = linear_problem
    result = solve_cnf(LinearField(matrix), x, exact_options(1e-6, adjoint=True))
    assert result.stats.nfe_backward == 0
    result.z.sum().backward()
    assert result.stats.nfe_backward > 0


def test_solve_reverse_inverts_forward(linear_problem):
    matrix, x = linear_problem
    field = LinearField(matrix)
    forward = solve_cnf(field, x, exact_options(1e-9), t1=0.7)
    backward = solve_cnf(field, forward.z, exact_options(1e-9), t1=0.7, reverse=True)
    torch.testing.assert_close(backward.z, x, rtol=0, atol=1e-8)
    torch.testing.assert_close(backward.delta_log_prob, -forward.delta_log_prob, rtol=0, atol=1e-12)


@pytest.mark.parametrize("adjoint", [False, True], ids=["direct", "adjoint"])
def test_solve_learned_t1_gradient_exact(linear_problem, adjoint):
    matrix, x = linear_problem
    block = CNFBlock(LinearField(matrix), t1=0.7, train_t1=True).double()
    result = block(x, exact_options(1e-10, adjoint=adjoint))
    (result.z.sum() + result.delta_log_prob.sum()).backward()

    # t1 = exp(log_t1), so d/d log_t1 = t1 d/dt1, with d z(t1)/dt1 = A expm(t1 A) x and
    # d delta/dt1 = -tr(A) per example.
    t1 = 0.7
    dz_dt1 = x @ (matrix @ torch.linalg.matrix_exp(t1 * matrix)).T
    expected = t1 * (float(dz_dt1.sum()) - x.shape[0] * float(torch.trace(matrix)))
    assert block.log_t1.grad is not None
    assert float(block.log_t1.grad) == pytest.approx(expected, rel=1e-6)


def test_solve_adjoint_gradients_match_direct():
    torch.manual_seed(0)
    field = MLPField(3, (16,)).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    grads = []
    for adjoint in (False, True):
        field.zero_grad()
        # An input that requires grad, like the input of every block after the first.
        x_in = x.clone().requires_grad_(True)
        result = solve_cnf(field, x_in, exact_options(1e-9, adjoint=adjoint))
        (result.z.pow(2).sum() + result.delta_log_prob.sum()).backward()
        grads.append([x_in.grad.clone()] + [p.grad.clone() for p in field.parameters()])
    # The adjoint solves the backward ODE at the same tolerance, so the two differ by solver
    # error only, at most about 1e-8 here.
    for direct, adjoint in zip(*grads):
        torch.testing.assert_close(adjoint, direct, rtol=1e-6, atol=1e-7)


def test_solve_step_budget_exceeded():
    x = torch.ones(2, 1, dtype=torch.float64)
    options = exact_options(1e-6, max_num_steps=10)
    with pytest.raises(SolveError, match="max_num_steps = 10") as info:
        solve_cnf(DecayField(1000.0), x, options)
    assert info.value.status == "step_budget_exceeded"
    # The budget counts attempted steps, accepted or rejected.
    stats = info.value.stats
    assert stats.accepted_steps + stats.rejected_steps == 10


def test_solve_blow_up_step_size_underflow():
    x = torch.full((2, 1), 10.0, dtype=torch.float64)
    with pytest.raises(SolveError, match="loosen the tolerance") as info:
        solve_cnf(SquareField(), x, exact_options(1e-3, max_num_steps=10_000))
    assert info.value.status == "step_size_underflow"
    assert info.value.stats.nfe_forward > 0


def test_solve_deadline_passed_timeout():
    x = torch.ones(2, 1, dtype=torch.float64)
    options = exact_options(1e-6, deadline=time.monotonic() - 1.0)
    with pytest.raises(SolveError, match="time limit") as info:
        solve_cnf(DecayField(1.0), x, options)
    assert info.value.status == "timeout"


@pytest.mark.parametrize("atol, rtol", [(0.0, 1e-5), (1e-5, -1e-5)])
def test_solve_nonpositive_tolerance_rejected(atol, rtol):
    x = torch.ones(2, 1)
    with pytest.raises(ValueError, match="invalid tolerance"):
        solve_cnf(DecayField(1.0), x, SolveOptions(atol=atol, rtol=rtol))
