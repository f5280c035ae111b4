"""Tests of the conditioning heads: priors at initialisation, marginal log-prob and the split."""

import math

import pytest
import torch

from infocnf.conditioning import ConditioningHead
from infocnf.config import ConditioningConfig


def standard_normal(z: torch.Tensor) -> torch.Tensor:
    return torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(dim=-1)


@pytest.mark.parametrize("method", ["none", "ccnf", "infocnf"])
def test_head_log_prob_standard_normal_at_init(method):
    head = ConditioningHead(12, 10, ConditioningConfig(method=method)).double()
    z = torch.randn(5, 12, dtype=torch.float64)
    labels = torch.tensor([0, 3, 9, 3, 1])
    # Zero-initialised label encoder: mean 0 and log-std 0 for every class.
    torch.testing.assert_close(head.log_prob(z, labels), standard_normal(z), rtol=0, atol=1e-12)
    torch.testing.assert_close(head.marginal_log_prob(z), standard_normal(z), rtol=0, atol=1e-12)


@pytest.mark.parametrize("method", ["ccnf", "infocnf"])
def test_head_marginal_log_prob_by_hand(method):
    num_classes, dim = 4, 6
    head = ConditioningHead(dim, num_classes, ConditioningConfig(method=method)).double()
    with torch.no_grad():
        head.prior_encoder.weight.normal_()
        head.prior_encoder.bias.normal_()
    z = torch.randn(3, dim, dtype=torch.float64)
    dim_y = head.dim_y

    # log p(z) = log sum_k p(z | k) / K, with p(z | k) = N(z_y; mu_k, sigma_k^2) N(z_u; 0, I).
    per_class = []
    for k in range(num_classes):
        params = head.prior_encoder.weight[:, k] + head.prior_encoder.bias
        mean, log_std = params[:dim_y], params[dim_y:]
        log_p_y = torch.distributions.Normal(mean, log_std.exp()).log_prob(z[:, :dim_y]).sum(dim=1)
        per_class.append(log_p_y + standard_normal(z[:, dim_y:]))
    per_class = torch.stack(per_class, dim=1)  # (batch, classes)
    expected = torch.logsumexp(per_class, dim=1) - math.log(num_classes)

    with torch.no_grad():
        torch.testing.assert_close(head.marginal_log_prob(z), expected, rtol=0, atol=1e-12)
        labels = torch.tensor([2, 0, 3])
        torch.testing.assert_close(head.log_prob(z, labels), per_class[torch.arange(3), labels], rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "dim, ratio, dim_y", [(64, 0.5, 32), (3072, 0.5, 1536), (192, 0.5, 96), (64, 0.25, 16), (10, 1.0, 10)]
)
def test_head_infocnf_supervised_size(dim, ratio, dim_y):
    head = ConditioningHead(dim, 10, ConditioningConfig(method="infocnf", supervised_ratio=ratio))
    assert head.dim_y == dim_y
    z_y, z_u = head.split(torch.randn(2, dim))
    assert z_y.shape == (2, dim_y)
    assert z_u.shape == (2, dim - dim_y)


def test_head_ccnf_conditions_whole_latent():
    head = ConditioningHead(12, 10, ConditioningConfig(method="ccnf"))
    assert head.dim_y == 12


@pytest.mark.parametrize("method", ["ccnf", "infocnf"])
def test_head_logits_zero_at_init(method):
    head = ConditioningHead(12, 10, ConditioningConfig(method=method))
    head.train()
    logits = head.logits(torch.randn(5, 12))
    assert logits.shape == (5, 10)
    assert torch.equal(logits, torch.zeros(5, 10))


def test_head_unconditional_has_no_logits():
    head = ConditioningHead(12, 10, ConditioningConfig(method="none"))
    assert not head.conditional
    assert head.logits(torch.randn(5, 12)) is None


def test_head_conditional_log_prob_requires_labels():
    head = ConditioningHead(12, 10, ConditioningConfig(method="infocnf"))
    with pytest.raises(ValueError, match="labels are required"):
        head.log_prob(torch.randn(2, 12), None)
