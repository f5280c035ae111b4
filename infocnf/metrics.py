"""Likelihood and classification metrics: bits per dimension and error rate."""

from __future__ import annotations

import math

import torch

__all__ = ["bits_per_dim", "count_errors"]


def bits_per_dim(log_prob: torch.Tensor, num_dims: int, levels: int) -> torch.Tensor:
    """Convert log p(x) of data rescaled to [0, 1] into bits per dimension.

    bpd = (-log p(x) / D + ln(levels)) / ln 2. The ln(levels) term undoes the rescaling of
    integer levels {0, ..., levels-1} to [0, 1): a density on [0, 1)^D is levels^D times the
    density on [0, levels)^D. For 8-bit images levels = 256, giving the usual ln 256.
    ``log_prob`` includes the logit transform's log-det; shape (batch,) in, (batch,) out.
    """
    return (-log_prob / num_dims + math.log(levels)) / math.log(2)


def count_errors(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Count the misclassified examples of a batch (a sum, so partial batches add up exactly)."""
    return (logits.argmax(dim=1) != labels).sum()
