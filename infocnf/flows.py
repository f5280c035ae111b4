"""CNF blocks and the two flows built from them: a flat stack and a multiscale image flow."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .config import ModelConfig
from .fields import ConvField, MLPField
from .solve import SolveOptions, SolveStats, solve_cnf
from .transforms import squeeze, unsqueeze

__all__ = ["CNFBlock", "FlatCNF", "MultiscaleCNF", "FlowOutput", "SolvePlan", "build_flow", "count_cnf_blocks"]

# Maps (block index, block input) to the options of that block's solve. Tolerance policies
# build these; the input is what a learned gate looks at.
SolvePlan = Callable[[int, torch.Tensor], SolveOptions]


@dataclass
class FlowOutput:
    """Latent z of shape (batch, features), delta_log_prob of shape (batch,), one stats record per block."""

    z: torch.Tensor
    delta_log_prob: torch.Tensor
    stats: list[SolveStats]


class CNFBlock(nn.Module):
    """One continuous normalizing flow: solve dz/dt = f(t, z) from 0 to t1."""

    def __init__(self, field: nn.Module, t1: float = 1.0, train_t1: bool = False):
        super().__init__()
        self.field = field
        # t1 = exp(log_t1) stays positive whatever the optimiser does.
        self.log_t1 = nn.Parameter(torch.tensor(math.log(t1)), requires_grad=train_t1)

    @property
    def t1(self) -> torch.Tensor:
        return self.log_t1.exp()

    def forward(self, x: torch.Tensor, options: SolveOptions):
        return solve_cnf(self.field, x, options, t1=self.t1)

    def inverse(self, z: torch.Tensor, options: SolveOptions):
        return solve_cnf(self.field, z, options, t1=self.t1, reverse=True)


class FlatCNF(nn.Module):
    """A stack of CNF blocks with MLP fields on flat inputs of shape (batch, features)."""

    def __init__(self, dim: int, config: ModelConfig):
        super().__init__()
        self.dim = dim
        self.blocks = nn.ModuleList(
            CNFBlock(MLPField(dim, config.hidden_dims, config.activation), config.t1, config.train_t1)
            for _ in range(config.num_blocks)
        )

    @property
    def block_shapes(self) -> list[tuple[int, ...]]:
        """Input shape of each block, without the batch dimension."""
        return [(self.dim,)] * len(self.blocks)

    def forward(self, x: torch.Tensor, plan: SolvePlan) -> FlowOutput:
        z = x.reshape(x.shape[0], -1)  # (batch, features)
        delta = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        stats = []
        for i, block in enumerate(self.blocks):
            result = block(z, plan(i, z))
            z, delta = result.z, delta + result.delta_log_prob
            stats.append(result.stats)
        return FlowOutput(z, delta, stats)

    def inverse(self, z: torch.Tensor, plan: SolvePlan) -> torch.Tensor:
        """Map a latent of shape (batch, features) back to data space."""
        x = z
        for i in reversed(range(len(self.blocks))):
            x = self.blocks[i].inverse(x, plan(i, x)).z
        return x


class MultiscaleCNF(nn.Module):
    """FFJORD-style multiscale flow on (batch, channels, height, width).

    Each scale but the last runs ``num_blocks`` CNF blocks, squeezes (4x channels, half the
    side), runs ``num_blocks`` more and factors out half of the channels; the last scale runs
    ``num_blocks`` blocks. The latent is the factored-out parts in scale order followed by the
    final state, flattened, so the first (largest) factor-out comes first.
    """

    def __init__(self, shape: tuple[int, int, int], config: ModelConfig):
        super().__init__()
        c, h, w = shape
        n = config.num_scales
        if h % 2 ** (n - 1) or w % 2 ** (n - 1):
            raise ValueError(
                f"invalid model.num_scales = {n} for images of {h}x{w}: each of the {n - 1} squeezes halves "
                f"the side, so height and width must be divisible by {2 ** (n - 1)}; lower num_scales"
            )
        self.shape = shape
        self.num_scales = n
        self.num_blocks = config.num_blocks
        blocks, shapes = [], []

        def add(channels: int, height: int, width: int) -> None:
            field = ConvField(channels, config.hidden_dims, config.activation)
            blocks.append(CNFBlock(field, config.t1, config.train_t1))
            shapes.append((channels, height, width))

        for scale in range(n):
            for _ in range(config.num_blocks):
                add(c, h, w)
            if scale < n - 1:
                c, h, w = 4 * c, h // 2, w // 2
                for _ in range(config.num_blocks):
                    add(c, h, w)
                c = c // 2  # Half the channels are factored out.
        self.blocks = nn.ModuleList(blocks)
        self._block_shapes = shapes

    @property
    def block_shapes(self) -> list[tuple[int, ...]]:
        """Input shape of each block, without the batch dimension."""
        return list(self._block_shapes)

    def _scale_blocks(self, scale: int) -> tuple[range, range]:
        per_scale = 2 * self.num_blocks
        start = scale * per_scale
        before = range(start, start + self.num_blocks)
        after = range(start + self.num_blocks, start + per_scale) if scale < self.num_scales - 1 else range(0)
        return before, after

    def forward(self, x: torch.Tensor, plan: SolvePlan) -> FlowOutput:
        delta = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        stats, parts = [], []
        h = x
        for scale in range(self.num_scales):
            before, after = self._scale_blocks(scale)
            for i in before:
                result = self.blocks[i](h, plan(i, h))
                h, delta = result.z, delta + result.delta_log_prob
                stats.append(result.stats)
            if scale == self.num_scales - 1:
                break
            h = squeeze(h)
            for i in after:
                result = self.blocks[i](h, plan(i, h))
                h, delta = result.z, delta + result.delta_log_prob
                stats.append(result.stats)
            half = h.shape[1] // 2
            parts.append(h[:, :half].reshape(h.shape[0], -1))
            h = h[:, half:]
        parts.append(h.reshape(h.shape[0], -1))
        return FlowOutput(torch.cat(parts, dim=1), delta, stats)

    def _part_shapes(self) -> list[tuple[int, int, int]]:
        c, h, w = self.shape
        shapes = []
        for _ in range(self.num_scales - 1):
            c, h, w = 4 * c, h // 2, w // 2
            shapes.append((c // 2, h, w))
            c = c // 2
        shapes.append((c, h, w))
        return shapes

    def inverse(self, z: torch.Tensor, plan: SolvePlan) -> torch.Tensor:
        """Map a latent of shape (batch, features) back to (batch, channels, height, width)."""
        shapes = self._part_shapes()
        sizes = [math.prod(s) for s in shapes]
        parts = [p.reshape(z.shape[0], *s) for p, s in zip(torch.split(z, sizes, dim=1), shapes)]
        h = parts[-1]
        for scale in reversed(range(self.num_scales)):
            before, after = self._scale_blocks(scale)
            if scale < self.num_scales - 1:
                h = torch.cat([parts[scale], h], dim=1)
                for i in reversed(after):
                    h = self.blocks[i].inverse(h, plan(i, h)).z
                h = unsqueeze(h)
            for i in reversed(before):
                h = self.blocks[i].inverse(h, plan(i, h)).z
        return h


def build_flow(shape: tuple[int, int, int], config: ModelConfig) -> FlatCNF | MultiscaleCNF:
    """Build the flow named by ``config.architecture`` for data of shape (channels, height, width)."""
    if config.architecture == "mlp":
        return FlatCNF(math.prod(shape), config)
    if config.architecture == "multiscale":
        return MultiscaleCNF(shape, config)
    raise ValueError(f"unknown model.architecture {config.architecture!r}: choose mlp or multiscale")


def count_cnf_blocks(config: ModelConfig) -> int:
    """Number of CNF blocks the configured flow has, without building it."""
    if config.architecture == "mlp":
        return config.num_blocks
    # Two groups of blocks per scale (before and after the squeeze), one group on the last scale.
    return (2 * (config.num_scales - 1) + 1) * config.num_blocks
