"""Tests of bits/dim, the logit transform's log-det and the model's density against hand values."""

import math

import pytest
import torch

from infocnf.config import ConditioningConfig, DataConfig, ModelConfig, RunConfig
from infocnf.metrics import bits_per_dim, count_errors
from infocnf.model import ConditionalCNF
from infocnf.solve import SolveOptions
from infocnf.transforms import inverse_logit_transform, logit_transform


@pytest.mark.parametrize("levels", [2, 17, 256])
def test_bits_per_dim_zero_log_prob(levels):
    # A density of 1 on [0, 1)^D costs log2(levels) bits per dimension on the integer grid.
    bpd = bits_per_dim(torch.zeros(3, dtype=torch.float64), num_dims=64, levels=levels)
    torch.testing.assert_close(bpd, torch.full((3,), math.log2(levels), dtype=torch.float64))


def test_bits_per_dim_hand_values():
    num_dims = 3072
    log_prob = torch.tensor([-num_dims * math.log(2), -2.5 * num_dims * math.log(2)], dtype=torch.float64)
    # Each ln 2 nat per dimension of -log p adds one bit: 8 + 1 and 8 + 2.5 for 8-bit data.
    expected = torch.tensor([9.0, 10.5], dtype=torch.float64)
    torch.testing.assert_close(bits_per_dim(log_prob, num_dims, 256), expected, rtol=0, atol=1e-12)


def test_count_errors_hand_values():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [5.0, -1.0]])
    assert int(count_errors(logits, torch.tensor([0, 0, 1]))) == 2


@pytest.mark.parametrize("alpha", [1e-6, 0.05])
def test_logit_transform_log_det_matches_autograd(alpha):
    x = torch.rand(2, 1, 2, 2, dtype=torch.float64)
    _, log_det = logit_transform(x, alpha)
    for i in range(2):
        jacobian = torch.autograd.functional.jacobian(lambda v: logit_transform(v, alpha)[0], x[i]).reshape(4, 4)
        assert float(log_det[i]) == pytest.approx(float(torch.linalg.slogdet(jacobian).logabsdet), abs=1e-10)


def test_logit_transform_inverse():
    x = torch.rand(3, 2, 4, 4, dtype=torch.float64)
    y, _ = logit_transform(x, 1e-6)
    torch.testing.assert_close(inverse_logit_transform(y, 1e-6), x, rtol=0, atol=1e-12)


def hand_bits_per_dim_without_dynamics(x: torch.Tensor, alpha: float, levels: int) -> torch.Tensor:
    """bits/dim of x under z = logit(alpha + (1 - 2 alpha) x), z ~ N(0, I), in float64."""
    x = x.double().reshape(x.shape[0], -1)
    s = alpha + (1 - 2 * alpha) * x
    y = torch.log(s / (1 - s))
    log_prior = (-0.5 * y.pow(2) - 0.5 * math.log(2 * math.pi)).sum(dim=1)
    log_det = (math.log(1 - 2 * alpha) - torch.log(s) - torch.log(1 - s)).sum(dim=1)
    num_dims = x.shape[1]
    return (-(log_prior + log_det) / num_dims + math.log(levels)) / math.log(2)


@pytest.mark.parametrize("method", ["none", "infocnf"])
@pytest.mark.parametrize("architecture", ["mlp", "multiscale"])
def test_model_bits_per_dim_without_dynamics(architecture, method):
    config = RunConfig(
        data=DataConfig(name="digits"),
        model=ModelConfig(architecture=architecture, hidden_dims=(8,), num_blocks=1, num_scales=2),
        conditioning=ConditioningConfig(method=method),
    )
    model = ConditionalCNF((1, 8, 8), 17, 10, config)
    with torch.no_grad():
        for param in model.flow.parameters():
            param.zero_()  # f(t, z) = 0: the flow is the identity up to a permutation.
    x = torch.rand(4, 1, 8, 8)
    labels = torch.tensor([0, 1, 2, 3])
    plan = lambda block, h: SolveOptions(atol=1e-3, rtol=1e-3)  # noqa: E731
    with torch.no_grad():
        out = model(x, labels, plan)
    expected = hand_bits_per_dim_without_dynamics(x, config.data.alpha, 17).float()
    # float32 model against a float64 hand computation: about 7 significant digits.
    torch.testing.assert_close(out.bits_per_dim, expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(out.bits_per_dim_marginal, expected, rtol=1e-5, atol=0)
