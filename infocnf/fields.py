"""Time-conditioned vector fields f(t, z): an MLP for flat data and a convolutional net for images."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["MLPField", "ConvField", "make_activation"]


def make_activation(name: str) -> nn.Module:
    """Build the activation named in ModelConfig.activation."""
    if name == "softplus":
        return nn.Softplus()
    if name == "tanh":
        return nn.Tanh()
    if name == "elu":
        return nn.ELU()
    raise ValueError(f"unknown activation {name!r}: choose softplus, tanh or elu")


class _ConcatLinear(nn.Module):
    """Linear layer on [z, t]: time enters every layer as one extra input feature."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.linear = nn.Linear(dim_in + 1, dim_out)

    def forward(self, tt: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Map h (batch, dim_in) and the time column tt (batch, 1) to (batch, dim_out)."""
        return self.linear(torch.cat([h, tt], dim=1))


class MLPField(nn.Module):
    """f(t, z) for z of shape (batch, features), with time concatenated to each layer's input."""

    def __init__(self, dim: int, hidden_dims: tuple[int, ...], activation: str = "softplus"):
        super().__init__()
        widths = (dim, *hidden_dims, dim)
        self.layers = nn.ModuleList(_ConcatLinear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.activation = make_activation(activation)

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        # The time column is the same for every layer, so it is built once per evaluation.
        tt = t.to(z).expand(z.shape[0], 1)  # (batch, 1)
        h = z
        for i, layer in enumerate(self.layers):
            h = layer(tt, h)
            if i < len(self.layers) - 1:
                h = self.activation(h)
        return h


class _ConcatConv2d(nn.Module):
    """3x3 convolution on [z, t]: time enters as one extra constant channel."""

    def __init__(self, channels_in: int, channels_out: int):
        super().__init__()
        self.conv = nn.Conv2d(channels_in + 1, channels_out, kernel_size=3, padding=1)

    def forward(self, tt: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Map h (batch, channels_in, height, width) and the time channel tt (batch, 1, height, width)."""
        return self.conv(torch.cat([h, tt], dim=1))


class ConvField(nn.Module):
    """f(t, z) for z of shape (batch, channels, height, width): 3x3 convolutions, time as a channel.

    With hidden_dims (64, 64, 64) this is the FFJORD multiscale ODE net: four convolutions of
    width 64 and softplus activations.
    """

    def __init__(self, channels: int, hidden_dims: tuple[int, ...], activation: str = "softplus"):
        super().__init__()
        widths = (channels, *hidden_dims, channels)
        self.layers = nn.ModuleList(_ConcatConv2d(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.activation = make_activation(activation)

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        # 3x3 convolutions with padding 1 keep the height and width, so every layer takes the
        # same time channel, built once per evaluation.
        tt = t.to(z).expand(z.shape[0], 1, z.shape[2], z.shape[3])  # (batch, 1, height, width)
        h = z
        for i, layer in enumerate(self.layers):
            h = layer(tt, h)
            if i < len(self.layers) - 1:
                h = self.activation(h)
        return h
