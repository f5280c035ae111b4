"""The conditional CNF model: logit transform, flow and conditioning head, with its loss."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .conditioning import ConditioningHead
from .config import RunConfig
from .flows import SolvePlan, build_flow
from .metrics import bits_per_dim
from .solve import SolveStats
from .transforms import inverse_logit_transform, logit_transform

__all__ = ["ConditionalCNF", "ModelOutput", "build_model"]


@dataclass
class ModelOutput:
    """Per-example results of one forward pass; tensors have shape (batch,) unless noted."""

    log_prob: torch.Tensor  # log p(x | y) of x in [0, 1]^D, or log p(x) when unconditional
    log_prob_marginal: torch.Tensor  # log p(x), classes summed out with a uniform prior
    bits_per_dim: torch.Tensor  # from log_prob
    bits_per_dim_marginal: torch.Tensor
    logits: torch.Tensor | None  # (batch, classes), None when unconditional
    z: torch.Tensor  # (batch, features)
    stats: list[SolveStats]


class ConditionalCNF(nn.Module):
    """Density model on images in [0, 1]: logit transform, CNF flow, label-conditional prior."""

    def __init__(self, shape: tuple[int, int, int], levels: int, num_classes: int, config: RunConfig):
        super().__init__()
        self.shape = tuple(shape)
        self.levels = levels
        self.num_dims = math.prod(shape)
        self.alpha = config.data.alpha
        self.flow = build_flow(self.shape, config.model)
        self.head = ConditioningHead(self.num_dims, num_classes, config.conditioning)
        self.ce_weight = config.conditioning.ce_weight

    @property
    def block_shapes(self) -> list[tuple[int, ...]]:
        return self.flow.block_shapes

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None, plan: SolvePlan) -> ModelOutput:
        """Score dequantised images x of shape (batch, channels, height, width) in [0, 1)."""
        y, logit_log_det = logit_transform(x, self.alpha)
        out = self.flow(y, plan)
        # log p(x) = log p(z) - delta_log_prob + log|dy/dx| (change of variables through flow and logit).
        log_px_given_z = -out.delta_log_prob + logit_log_det
        log_prob_marginal = self.head.marginal_log_prob(out.z) + log_px_given_z
        if self.head.conditional and labels is not None:
            log_prob = self.head.log_prob(out.z, labels) + log_px_given_z
        else:
            log_prob = log_prob_marginal
        return ModelOutput(
            log_prob=log_prob,
            log_prob_marginal=log_prob_marginal,
            bits_per_dim=bits_per_dim(log_prob, self.num_dims, self.levels),
            bits_per_dim_marginal=bits_per_dim(log_prob_marginal, self.num_dims, self.levels),
            logits=self.head.logits(out.z),
            z=out.z,
            stats=out.stats,
        )

    def loss(self, out: ModelOutput, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """J = mean bits/dim of log p(x | y) + ce_weight * cross-entropy of the classifier.

        Returns the loss and its detached parts (``nll_bpd``, ``cross_entropy``).
        """
        nll = out.bits_per_dim.mean()
        parts = {"nll_bpd": nll.detach()}
        if out.logits is None:
            return nll, parts
        cross_entropy = F.cross_entropy(out.logits, labels)
        parts["cross_entropy"] = cross_entropy.detach()
        return nll + self.ce_weight * cross_entropy, parts

    @torch.no_grad()
    def sample(self, labels: torch.Tensor, plan: SolvePlan, temperature: float = 1.0) -> torch.Tensor:
        """Draw images in [0, 1] of shape (batch, channels, height, width), one per label."""
        n = labels.shape[0]
        z = torch.randn(n, self.num_dims, device=labels.device) * temperature
        if self.head.conditional:
            mean, log_std = self.head.prior_params(labels)
            z[:, : self.head.dim_y] = mean + log_std.exp() * z[:, : self.head.dim_y]
        y = self.flow.inverse(z, plan)
        return inverse_logit_transform(y.reshape(n, *self.shape), self.alpha).clamp(0, 1)


def build_model(config: RunConfig, shape: tuple[int, int, int], levels: int, num_classes: int) -> ConditionalCNF:
    """Build the model a run config describes for data of this shape and number of levels."""
    return ConditionalCNF(shape, levels, num_classes, config)
