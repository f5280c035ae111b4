"""Fixed invertible transforms with known log-determinants: logit and squeeze."""

from __future__ import annotations

import math

import torch

__all__ = ["logit_transform", "inverse_logit_transform", "squeeze", "unsqueeze"]


def logit_transform(x: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Map x in [0, 1] to y = logit(s), s = alpha + (1 - 2 alpha) x; return y and log|dy/dx| per example.

    The flow models y on the whole real line, so log p(x) = log p(y) + log|dy/dx| with
    log|dy/dx| = sum over pixels of log(1 - 2 alpha) - log s - log(1 - s). The offset alpha
    (FFJORD uses 1e-6) keeps s away from 0 and 1, where the logit is infinite.
    x has shape (batch, ...); the log-det has shape (batch,).
    """
    s = alpha + (1 - 2 * alpha) * x
    y = torch.log(s) - torch.log1p(-s)
    log_det = math.log(1 - 2 * alpha) - torch.log(s) - torch.log1p(-s)
    return y, log_det.reshape(x.shape[0], -1).sum(dim=1)


def inverse_logit_transform(y: torch.Tensor, alpha: float) -> torch.Tensor:
    """Map y back to x in [0, 1]: the inverse of ``logit_transform``."""
    return (torch.sigmoid(y) - alpha) / (1 - 2 * alpha)


def squeeze(x: torch.Tensor) -> torch.Tensor:
    """Trade space for channels: (batch, c, h, w) -> (batch, 4c, h/2, w/2); volume preserving."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // 2, 2, w // 2, 2)
    x = x.permute(0, 1, 3, 5, 2, 4)  # (batch, c, 2, 2, h/2, w/2)
    return x.reshape(b, c * 4, h // 2, w // 2)


def unsqueeze(x: torch.Tensor) -> torch.Tensor:
    """Inverse of ``squeeze``: (batch, 4c, h/2, w/2) -> (batch, c, h, w)."""
    b, c4, h2, w2 = x.shape
    c = c4 // 4
    x = x.reshape(b, c, 2, 2, h2, w2)
    x = x.permute(0, 1, 4, 2, 5, 3)  # (batch, c, h/2, 2, w/2, 2)
    return x.reshape(b, c, h2 * 2, w2 * 2)
