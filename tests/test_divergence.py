"""Tests of the divergence estimators against traces of autograd Jacobians."""

import math

import pytest
import torch

from infocnf.divergence import divergence_exact, divergence_hutchinson, draw_probe
from infocnf.fields import ConvField, MLPField


def per_example_traces(field, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """tr(d field / d z) of each example, from the full Jacobian of that example alone."""
    traces = []
    for example in z:
        jacobian = torch.autograd.functional.jacobian(lambda v: field(t, v[None])[0], example)
        size = example.numel()
        traces.append(torch.trace(jacobian.reshape(size, size)))
    return torch.stack(traces)


FIELDS = {
    "mlp": (lambda: MLPField(5, (16, 16)), (5,)),
    "conv": (lambda: ConvField(2, (8,)), (2, 3, 3)),
}


@pytest.mark.parametrize("name", FIELDS)
def test_divergence_exact_matches_jacobian_trace(name):
    make_field, shape = FIELDS[name]
    field = make_field().double()
    t = torch.tensor(0.3, dtype=torch.float64)
    z = torch.randn(4, *shape, dtype=torch.float64, requires_grad=True)
    div = divergence_exact(field(t, z), z, create_graph=False)
    assert div.shape == (4,)
    torch.testing.assert_close(div, per_example_traces(field, t, z.detach()), rtol=0, atol=1e-12)


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
@pytest.mark.parametrize("name", FIELDS)
def test_divergence_hutchinson_averages_to_trace(name, probe):
    make_field, shape = FIELDS[name]
    field = make_field().double()
    t = torch.tensor(0.3, dtype=torch.float64)
    # One point repeated: every row draws its own probe, so the rows are independent estimates.
    draws = 20_000
    z = torch.randn(1, *shape, dtype=torch.float64)
    exact = per_example_traces(field, t, z)[0]
    z = z.expand(draws, *shape).clone().requires_grad_(True)
    estimates = divergence_hutchinson(field(t, z), z, draw_probe(z, probe), create_graph=False)
    standard_error = float(estimates.std()) / math.sqrt(draws)
    # The estimator is unbiased: the mean lies within 5 standard errors of the trace.
    assert abs(float(estimates.mean()) - float(exact)) < 5 * standard_error


def test_divergence_hutchinson_quadratic_form():
    matrix = torch.randn(4, 4, dtype=torch.float64)
    z = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    probe = draw_probe(z, "gaussian")
    estimate = divergence_hutchinson(z @ matrix.T, z, probe, create_graph=False)
    # For f(z) = A z the estimate is e^T A e exactly.
    torch.testing.assert_close(estimate, torch.einsum("bi,ij,bj->b", probe, matrix, probe), rtol=0, atol=1e-12)


def test_draw_probe_rademacher_values():
    like = torch.zeros(100, 3, 2, dtype=torch.float64)
    probe = draw_probe(like, "rademacher")
    assert probe.shape == like.shape
    assert probe.dtype == torch.float64
    assert set(probe.unique().tolist()) == {-1.0, 1.0}


def test_draw_probe_unknown_kind_rejected():
    with pytest.raises(ValueError, match="unknown probe 'uniform'"):
        draw_probe(torch.zeros(2, 3), "uniform")
