"""Seeded bi-directional 2-D spirals: noise-free trajectories, noisy observed windows, direction labels."""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch

from .config import SpiralConfig

__all__ = ["SpiralSet", "SpiralSplits", "SPIRAL_PRESETS", "CLOCKWISE", "COUNTER_CLOCKWISE", "generate_spirals", "make_spiral_splits"]

# Direction labels: the angle decreases (clockwise) or increases (counter-clockwise) with time.
CLOCKWISE = 0
COUNTER_CLOCKWISE = 1

# "paper": 5,000 training spirals, the size of the InfoCNF time-series experiment (Nguyen et al.,
# "InfoCNF", 2019), with separate validation and test sets. "quick": small enough to train both
# priors over 3 seeds on 2 CPU cores in about 10 minutes.
# NOTE: 500 validation and 1,000 test spirals are our choice; the InfoCNF paper does not give these sizes.
SPIRAL_PRESETS = {
    "paper": SpiralConfig(num_train=5000, num_val=500, num_test=1000),
    "quick": SpiralConfig(num_train=400, num_val=100, num_test=200),
}

# Seed streams of the three splits, so each split is the same whatever the others' sizes.
_SPLIT_STREAMS = {"train": 0, "val": 1, "test": 2}


@dataclass
class SpiralSet:
    """Spirals of one split, as float32 tensors.

    ``grid`` (grid_points,) is the time grid and ``truth`` (spirals, grid_points, 2) the
    noise-free trajectories on it. ``observed`` (spirals, window_points, 2) is the noisy window
    that starts at grid index ``window_start`` (spirals,). ``labels`` (spirals,) is CLOCKWISE or
    COUNTER_CLOCKWISE, and ``radius``, ``growth`` and ``phase`` (spirals,) are the drawn parameters.
    """

    grid: torch.Tensor
    truth: torch.Tensor
    observed: torch.Tensor
    window_start: torch.Tensor
    labels: torch.Tensor
    radius: torch.Tensor
    growth: torch.Tensor
    phase: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def window_points(self) -> int:
        return int(self.observed.shape[1])

    @property
    def dt(self) -> float:
        return float(self.grid[1] - self.grid[0])

    def relative_times(self, num_points: int, backward: bool = False) -> torch.Tensor:
        """Times (num_points,) of consecutive grid points from a window start: 0, dt, 2 dt, ...

        With ``backward`` they run 0, -dt, -2 dt, ..., for a solve back in time.
        """
        times = torch.arange(num_points, device=self.grid.device, dtype=self.grid.dtype) * self.dt
        return -times if backward else times

    def alternating_indices(self, count: int) -> torch.Tensor:
        """Indices of the first ``count`` spirals taken alternately clockwise and counter-clockwise."""
        clockwise = torch.nonzero(self.labels == CLOCKWISE).flatten().tolist()
        counter = torch.nonzero(self.labels != CLOCKWISE).flatten().tolist()
        pairs = itertools.zip_longest(clockwise, counter)
        return torch.tensor([i for pair in pairs for i in pair if i is not None][:count], dtype=torch.long)

    def subset(self, index: torch.Tensor | list[int]) -> SpiralSet:
        """Return the spirals at ``index`` (the grid is shared)."""
        index = torch.as_tensor(index, dtype=torch.long)
        return SpiralSet(self.grid, *(getattr(self, f.name)[index] for f in dataclasses.fields(self)[1:]))

    def to(self, device: torch.device | str) -> SpiralSet:
        return SpiralSet(*(getattr(self, f.name).to(device) for f in dataclasses.fields(self)))

    def segment(self, offset: int, points: int) -> torch.Tensor:
        """Noise-free points ``offset`` grid steps from each window start: (spirals, points, 2).

        offset 0 with ``window_points`` points is the window itself, offset ``window_points`` the
        points after it, and a negative offset the points before it.
        """
        steps = torch.arange(points, device=self.truth.device) + offset
        index = self.window_start[:, None] + steps[None, :]  # (spirals, points)
        if int(index.min()) < 0 or int(index.max()) >= self.truth.shape[1]:
            raise ValueError(
                f"invalid segment offset={offset}, points={points}: it leaves the grid of {self.truth.shape[1]} "
                "points for some spirals; raise data.grid_points or lower data.extrapolate_points"
            )
        return torch.gather(self.truth, 1, index[:, :, None].expand(-1, -1, 2))


@dataclass
class SpiralSplits:
    """Train, validation and test spirals of one config."""

    train: SpiralSet
    val: SpiralSet
    test: SpiralSet
    config: SpiralConfig

    def to(self, device: torch.device | str) -> SpiralSplits:
        return SpiralSplits(self.train.to(device), self.val.to(device), self.test.to(device), self.config)


def generate_spirals(config: SpiralConfig, num_spirals: int, stream: int = 0) -> SpiralSet:
    """Draw ``num_spirals`` spirals, the first half clockwise, from the seed (config.seed, stream).

    Each spiral is r(t) (cos theta(t), sin theta(t)) on the grid t in [0, t1], with
    r(t) = radius + growth * t and theta(t) = phase + direction * t. The direction is -1 for
    clockwise and +1 for counter-clockwise, and both directions spiral outwards. The observed
    window starts at a uniform grid index that leaves extrapolate_points grid points on either side.
    """
    if num_spirals < 2:
        raise ValueError(f"invalid num_spirals = {num_spirals}: expected >= 2, so both directions appear")
    rng = np.random.default_rng([config.seed, stream])
    grid = np.linspace(0.0, config.t1, config.grid_points)

    labels = np.full(num_spirals, COUNTER_CLOCKWISE, dtype=np.int64)
    labels[: num_spirals // 2] = CLOCKWISE
    direction = np.where(labels == CLOCKWISE, -1.0, 1.0)
    radius = rng.uniform(config.radius_min, config.radius_max, num_spirals)
    growth = rng.uniform(config.growth_min, config.growth_max, num_spirals)
    phase = rng.uniform(0.0, 2 * math.pi, num_spirals)

    r = radius[:, None] + growth[:, None] * grid[None, :]  # (spirals, grid_points)
    theta = phase[:, None] + direction[:, None] * grid[None, :]
    truth = np.stack([r * np.cos(theta), r * np.sin(theta)], axis=-1)  # (spirals, grid_points, 2)

    margin = config.extrapolate_points
    last_start = config.grid_points - config.window_points - margin
    window_start = rng.integers(margin, last_start + 1, num_spirals)
    index = window_start[:, None] + np.arange(config.window_points)[None, :]  # (spirals, window_points)
    clean = np.take_along_axis(truth, index[:, :, None], axis=1)
    observed = clean + config.noise_std * rng.standard_normal(clean.shape)

    as_float = lambda a: torch.as_tensor(a, dtype=torch.float32)  # noqa: E731
    return SpiralSet(
        grid=as_float(grid),
        truth=as_float(truth),
        observed=as_float(observed),
        window_start=torch.as_tensor(window_start, dtype=torch.long),
        labels=torch.as_tensor(labels),
        radius=as_float(radius),
        growth=as_float(growth),
        phase=as_float(phase),
    )


def make_spiral_splits(config: SpiralConfig) -> SpiralSplits:
    """Generate the train, validation and test spirals, each from its own seed stream."""
    return SpiralSplits(
        train=generate_spirals(config, config.num_train, _SPLIT_STREAMS["train"]),
        val=generate_spirals(config, config.num_val, _SPLIT_STREAMS["val"]),
        test=generate_spirals(config, config.num_test, _SPLIT_STREAMS["test"]),
        config=config,
    )
