"""Label conditioning of the latent: unconditional, CCNF (whole latent) and InfoCNF (z_y only)."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .config import ConditioningConfig

__all__ = ["ConditioningHead", "standard_normal_log_prob", "gaussian_log_prob"]

_LOG_2PI = math.log(2 * math.pi)


def standard_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I) summed over features: z (batch, features) -> (batch,)."""
    return -0.5 * (z.pow(2) + _LOG_2PI).sum(dim=-1)


def gaussian_log_prob(z: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """log N(z; mean, exp(log_std)^2) summed over the last dimension."""
    return -0.5 * (((z - mean) * torch.exp(-log_std)).pow(2) + 2 * log_std + _LOG_2PI).sum(dim=-1)


class ConditioningHead(nn.Module):
    """Prior over the latent and label classifier.

    ``none``: z ~ N(0, I). ``ccnf``: the whole z has prior N(mu(y), sigma(y)^2) and feeds the
    classifier. ``infocnf``: z splits into z_y (the first ``supervised_ratio`` of the features)
    and z_u; only z_y is class-conditional and classified, and z_u ~ N(0, I). The label encoder
    and classifier start at zero, so training starts from the N(0, I) prior and uniform guesses.
    """

    def __init__(self, dim: int, num_classes: int, config: ConditioningConfig):
        super().__init__()
        self.method = config.method
        self.dim = dim
        self.num_classes = num_classes
        if config.method == "none":
            self.dim_y = 0
        elif config.method == "ccnf":
            self.dim_y = dim
        else:
            self.dim_y = max(1, min(dim, int(round(config.supervised_ratio * dim))))
        if self.dim_y:
            # One-hot label -> (mean, log-std) of z_y's prior.
            self.prior_encoder = nn.Linear(num_classes, 2 * self.dim_y)
            self.classifier = nn.Linear(self.dim_y, num_classes)
            self.dropout = nn.Dropout(config.classifier_dropout)
            for layer in (self.prior_encoder, self.classifier):
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)

    @property
    def conditional(self) -> bool:
        return self.dim_y > 0

    def split(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Split z (batch, features) into z_y (batch, dim_y) and z_u (batch, features - dim_y)."""
        return z[:, : self.dim_y], z[:, self.dim_y :]

    def prior_params(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-std of z_y's prior for labels of shape (batch,); each (batch, dim_y)."""
        onehot = F.one_hot(labels, self.num_classes).to(self.prior_encoder.weight.dtype)
        mean, log_std = self.prior_encoder(onehot).chunk(2, dim=-1)
        return mean, log_std

    def log_prob(self, z: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """log p(z | y) of shape (batch,); for ``none`` (or labels None there) log N(z; 0, I)."""
        if not self.conditional:
            return standard_normal_log_prob(z)
        if labels is None:
            raise ValueError("labels are required for log p(z | y) of a conditional model; use marginal_log_prob")
        z_y, z_u = self.split(z)
        mean, log_std = self.prior_params(labels)
        return gaussian_log_prob(z_y, mean, log_std) + standard_normal_log_prob(z_u)

    def marginal_log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log p(z) = logsumexp_k [log p(z | k) + log(1/K)] with a uniform class prior; shape (batch,)."""
        if not self.conditional:
            return standard_normal_log_prob(z)
        z_y, z_u = self.split(z)
        classes = torch.arange(self.num_classes, device=z.device)
        mean, log_std = self.prior_params(classes)  # (classes, dim_y)
        per_class = gaussian_log_prob(z_y[:, None, :], mean[None], log_std[None])  # (batch, classes)
        log_p_y = torch.logsumexp(per_class, dim=1) - math.log(self.num_classes)
        return log_p_y + standard_normal_log_prob(z_u)

    def logits(self, z: torch.Tensor) -> torch.Tensor | None:
        """Class logits (batch, classes) from z_y, or None for an unconditional model."""
        if not self.conditional:
            return None
        z_y, _ = self.split(z)
        return self.classifier(self.dropout(z_y))
