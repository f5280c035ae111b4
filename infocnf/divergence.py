"""Divergence of a vector field: exact (small dimensions) and Hutchinson's trace estimator."""

from __future__ import annotations

import torch

__all__ = ["draw_probe", "divergence_hutchinson", "divergence_exact"]


def draw_probe(like: torch.Tensor, kind: str) -> torch.Tensor:
    """Draw a probe vector shaped like ``like``: Rademacher (+-1) or standard Gaussian.

    Both have E[e e^T] = I, so E[e^T J e] = tr(J); Rademacher has the lower variance.
    """
    if kind == "rademacher":
        return torch.randint(0, 2, like.shape, device=like.device).to(like.dtype) * 2 - 1
    if kind == "gaussian":
        return torch.randn_like(like)
    raise ValueError(f"unknown probe {kind!r}: choose rademacher or gaussian")


def divergence_hutchinson(dz: torch.Tensor, z: torch.Tensor, probe: torch.Tensor, create_graph: bool) -> torch.Tensor:
    """Estimate tr(d dz / d z) per example as e^T J e with one vector-Jacobian product.

    ``dz``, ``z`` and ``probe`` have shape (batch, ...); returns shape (batch,).
    """
    (e_jac,) = torch.autograd.grad(dz, z, probe, create_graph=create_graph)
    return (e_jac * probe).reshape(z.shape[0], -1).sum(dim=1)


def divergence_exact(dz: torch.Tensor, z: torch.Tensor, create_graph: bool) -> torch.Tensor:
    """Compute tr(d dz / d z) per example exactly, with one backward pass per dimension.

    Costs D vector-Jacobian products for D = prod(z.shape[1:]), so use it for small D only.
    """
    flat_dz = dz.reshape(z.shape[0], -1)  # (batch, D)
    total = torch.zeros(z.shape[0], dtype=dz.dtype, device=dz.device)
    for i in range(flat_dz.shape[1]):
        (grad_i,) = torch.autograd.grad(flat_dz[:, i].sum(), z, create_graph=create_graph, retain_graph=True)
        total = total + grad_i.reshape(z.shape[0], -1)[:, i]
    return total
