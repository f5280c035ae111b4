"""The benchmarked workloads: one CNF training iteration on the digits InfoCNF or an MNIST-shaped flow."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.profiler import record_function

from infocnf.config import RunConfig, apply_overrides, load_config
from infocnf.data import dequantize, load_splits
from infocnf.model import build_model
from infocnf.tolerance import FixedPlan

__all__ = [
    "DIGITS_CONFIG",
    "ITERATION_RANGE",
    "PHASE_RANGES",
    "StepRecord",
    "Workload",
    "TrainingStep",
    "digits_workload",
    "mnist_workload",
]

DIGITS_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "digits-infocnf.toml"

# torch.profiler ranges that TrainingStep opens while a profiler runs: one around the whole
# iteration and one per phase, so that a profile can be split by phase.
ITERATION_RANGE = "bench.iteration"
PHASE_RANGES = ("bench.forward", "bench.backward", "bench.optimizer")


@dataclass(frozen=True)
class StepRecord:
    """One training iteration: wall-clock and process CPU seconds, NFE summed over the CNF blocks.

    On a shared machine the CPU seconds are the steadier figure, because time spent waiting for
    a core that another process is using counts in ``elapsed_s`` but not in ``cpu_s``.
    """

    elapsed_s: float
    cpu_s: float
    nfe_forward: int
    nfe_backward: int


@dataclass(frozen=True)
class Workload:
    """A model config and the images it trains on: uint8 (examples, channels, height, width)."""

    name: str
    config: RunConfig
    images: torch.Tensor
    labels: torch.Tensor
    levels: int
    num_classes: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])


def digits_workload(config_path: str | Path = DIGITS_CONFIG, hidden_dims: tuple[int, ...] | None = None) -> Workload:
    """Load the digits InfoCNF of ``config_path`` with the 1,294 real 8x8 training digits."""
    config = load_config(config_path)
    if hidden_dims is not None:
        config = apply_overrides(config, {"model.hidden_dims": list(hidden_dims)})
    splits = load_splits(config.data)
    return Workload("digits", config, splits.train.images, splits.train.labels, splits.levels, splits.num_classes)


def mnist_workload(
    examples: int = 512,
    shape: tuple[int, int, int] = (1, 28, 28),
    num_scales: int = 3,
    hidden_dims: tuple[int, ...] = (64, 64, 64),
    num_blocks: int = 2,
    seed: int = 0,
) -> Workload:
    """Build a multiscale InfoCNF with convolutional fields on random 8-bit images of MNIST's shape.

    Random pixels cost the same per evaluation as real digits. Only the NFE that a trained model
    needs differs, so these numbers measure the cost of a step, not accuracy.
    """
    raw = {
        # The data section is only validated, never loaded: images come from the generator below.
        "data": {"name": "mnist", "data_root": "unused"},
        "model": {
            "architecture": "multiscale",
            "num_scales": num_scales,
            "hidden_dims": list(hidden_dims),
            "num_blocks": num_blocks,
        },
        "conditioning": {"method": "infocnf"},
    }
    config = RunConfig.from_dict(raw)
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (examples, *shape), generator=generator, dtype=torch.uint8)
    labels = torch.randint(0, 10, (examples,), generator=generator)
    return Workload("mnist-shaped", config, images, labels, 256, 10)


def _profiled_range(name: str):
    return record_function(name) if torch.autograd._profiler_enabled() else nullcontext()


class TrainingStep:
    """A minimal training loop with no logging: dequantise, solve, loss, backward, clip, Adam step.

    Each call trains on a fresh batch of ``batch_size`` examples drawn from the workload with a
    seeded generator, at atol = rtol = ``tolerance`` for every CNF block. The Adam settings and
    the gradient clip are those of the workload's config.
    """

    def __init__(
        self,
        workload: Workload,
        batch_size: int,
        tolerance: float,
        device: torch.device,
        adjoint: bool = False,
        seed: int = 0,
    ):
        if batch_size < 1:
            raise ValueError(f"invalid batch size {batch_size}: expected an integer >= 1")
        if not tolerance > 0:
            raise ValueError(f"invalid tolerance {tolerance!r}: expected a value > 0, for example 1e-5")
        self.config = apply_overrides(workload.config, {"solver.adjoint": adjoint})
        self.workload = workload
        self.batch_size = batch_size
        self.tolerance = tolerance
        self.device = device
        torch.manual_seed(seed)
        self.model = build_model(self.config, workload.shape, workload.levels, workload.num_classes).to(device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(self.params, lr=self.config.train.lr)
        self.images = workload.images.to(device)
        self.labels = workload.labels.to(device)
        self.generator = torch.Generator().manual_seed(seed)
        self.last_stats: list = []  # SolveStats of each CNF block in the last iteration.

    def __call__(self) -> tuple[int, int]:
        """Run one iteration and return its (nfe_forward, nfe_backward) summed over the blocks."""
        index = torch.randint(0, self.images.shape[0], (self.batch_size,), generator=self.generator).to(self.device)
        images, labels = self.images[index], self.labels[index]
        with _profiled_range(ITERATION_RANGE):
            with _profiled_range(PHASE_RANGES[0]):
                x = dequantize(images, self.workload.levels)
                out = self.model(x, labels, FixedPlan(self.config.solver, tolerance=self.tolerance))
                loss, _ = self.model.loss(out, labels)
            with _profiled_range(PHASE_RANGES[1]):
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
            with _profiled_range(PHASE_RANGES[2]):
                if self.config.train.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(self.params, self.config.train.grad_clip)
                self.optimizer.step()
        # Backward NFE is known only once loss.backward() has run.
        self.last_stats = out.stats
        return sum(s.nfe_forward for s in out.stats), sum(s.nfe_backward for s in out.stats)
