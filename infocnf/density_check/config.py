"""Settings of the density validity check: the mixture, the flow, its training and the tolerance sweep."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ConditioningConfig, ModelConfig
from ..toml_config import (
    ConfigFormat,
    apply_dotted_overrides,
    build_dataclass,
    config_to_dict,
    load_toml_config,
    save_toml_config,
    stable_hash,
)

__all__ = [
    "MixtureConfig",
    "DensityTrainConfig",
    "SweepConfig",
    "DensityCheckConfig",
    "validate_tolerances",
    "load_density_check_config",
    "save_density_check_config",
    "apply_density_check_overrides",
]

# FFJORD evaluates at 1e-5, and the default sweep spans four decades looser and three tighter.
DEFAULT_TOLERANCES = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8)

# NaN and infinity are rejected when read, because some checks such as model.t1 > 0 let infinity through.
_TOML_FORMAT = ConfigFormat(
    top_table="top level",
    unknown_key="unknown setting {where}: the table accepts {accepted}",
    not_a_section="unknown setting {key!r}: {part!r} is not a section; sections are {sections}",
    override_example="sweep.threshold=1e-4",
    finite_floats=True,
)


def _require(condition: bool, where: str, value: Any, expected: str) -> None:
    if not condition:
        raise ValueError(f"invalid {where} = {value!r}: expected {expected}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate_tolerances(tolerances: Any, where: str = "sweep.tolerances") -> tuple[float, ...]:
    """Check a tolerance list and return it as floats.

    A valid list is non-empty, every value is a finite number in (0, 1), and the values are
    strictly decreasing (loosest first), which also rules out duplicates. Anything else raises
    ValueError naming the offending value.
    """
    if isinstance(tolerances, (str, bytes)) or not hasattr(tolerances, "__len__"):
        raise ValueError(f"invalid {where} = {tolerances!r}: expected a list of tolerances such as [1e-1, 1e-2, 1e-3]")
    values = list(tolerances)
    if not values:
        raise ValueError(f"invalid {where} = []: expected at least one tolerance, for example [1e-3, 1e-5, 1e-7]")
    for i, value in enumerate(values):
        _require(_is_number(value) and 0 < value < 1, f"{where}[{i}]", value, "a tolerance in (0, 1), for example 1e-5")
    for i in range(1, len(values)):
        if values[i] == values[i - 1]:
            raise ValueError(
                f"invalid {where}[{i}] = {values[i]!r}: the value {values[i]!r} is listed twice; list each tolerance once"
            )
        if values[i] > values[i - 1]:
            raise ValueError(
                f"invalid {where}[{i}] = {values[i]!r}: it is looser than the value before it ({values[i - 1]!r}); "
                "list tolerances from loosest to tightest, for example [1e-1, 1e-2, 1e-3]"
            )
    return tuple(float(v) for v in values)


@dataclass(frozen=True)
class MixtureConfig:
    """Gaussian mixture the flow is trained on, with the component index as the label."""

    # One mean per component: numbers for 1-D data, [x, y] pairs for 2-D data.
    means: tuple[tuple[float, ...], ...] = ((-2.8,), (-0.9,), (2.0,))
    # Variance of each component along every axis (isotropic components).
    variance: float = 0.4
    # Component weights, normalised to sum to one. An empty list means equal weights.
    weights: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        _require(isinstance(self.means, (list, tuple)) and len(self.means) > 0, "mixture.means", self.means,
                 "a non-empty list of component means, for example [-2.8, -0.9, 2.0] or [[0, 1], [1, 0]]")
        means = []
        for i, mean in enumerate(self.means):
            point = (mean,) if _is_number(mean) else mean
            _require(isinstance(point, (list, tuple)) and len(point) in (1, 2) and all(_is_number(v) for v in point),
                     f"mixture.means[{i}]", mean, "a finite number (1-D) or a pair of finite numbers (2-D)")
            means.append(tuple(float(v) for v in point))
        _require(len({len(m) for m in means}) == 1, "mixture.means", self.means,
                 "means of one dimension: all numbers (1-D) or all pairs (2-D)")
        object.__setattr__(self, "means", tuple(means))
        _require(_is_number(self.variance) and self.variance > 0, "mixture.variance", self.variance, "a variance > 0")
        object.__setattr__(self, "weights", tuple(self.weights))
        if self.weights:
            _require(len(self.weights) == len(means), "mixture.weights", list(self.weights),
                     f"one weight per component ({len(means)}), or [] for equal weights")
            for i, weight in enumerate(self.weights):
                _require(_is_number(weight) and weight > 0, f"mixture.weights[{i}]", weight, "a weight > 0")
        object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))

    @property
    def dim(self) -> int:
        """Number of features of a data point: 1 or 2."""
        return len(self.means[0])

    @property
    def num_components(self) -> int:
        return len(self.means)

    @property
    def probabilities(self) -> tuple[float, ...]:
        """Component weights normalised to sum to one."""
        weights = self.weights or (1.0,) * self.num_components
        total = sum(weights)
        return tuple(w / total for w in weights)


@dataclass(frozen=True)
class DensityTrainConfig:
    """Adam on fresh mixture samples each iteration, with exact-divergence solves."""

    iterations: int = 500
    batch_size: int = 256
    lr: float = 3e-3
    # atol = rtol of every training solve.
    tolerance: float = 1e-4
    # Log the training loss every this many iterations.
    log_every: int = 100
    device: str = "cpu"

    def __post_init__(self) -> None:
        _require(isinstance(self.iterations, int) and self.iterations >= 0, "train.iterations", self.iterations,
                 "an integer >= 0 (0 leaves the flow at its initialisation)")
        _require(isinstance(self.batch_size, int) and self.batch_size >= 1, "train.batch_size", self.batch_size,
                 "an integer >= 1")
        _require(_is_number(self.lr) and self.lr > 0, "train.lr", self.lr, "a learning rate > 0, for example 3e-3")
        _require(_is_number(self.tolerance) and 0 < self.tolerance < 1, "train.tolerance", self.tolerance,
                 "a tolerance in (0, 1), for example 1e-4")
        _require(isinstance(self.log_every, int) and self.log_every >= 1, "train.log_every", self.log_every,
                 "an integer >= 1")
        _require(self.device in ("auto", "cpu") or self.device.startswith("cuda"), "train.device", self.device,
                 "auto, cpu or cuda[:N]")


@dataclass(frozen=True)
class SweepConfig:
    """Tolerances to sweep, the pass threshold, and the integration grid and cross-check."""

    tolerances: tuple[float, ...] = DEFAULT_TOLERANCES
    # Bound on |integral - 1| that a tolerance must meet for every label, together with every tighter
    # tolerance, to become the verdict.
    threshold: float = 1e-3
    # The grid covers [low, high] on every axis and must hold the mass of the density.
    low: float = -15.0
    high: float = 15.0
    # Grid points per axis, so the cell width is (high - low) / points.
    points: int = 3000
    # Swept tolerances at which scipy.integrate.quad cross-checks the 1-D Riemann sum ([] skips it,
    # and 2-D data ignores it). Every point quad requests is a solve of its own, which makes quad
    # hundreds of times costlier than the grid, so by default it runs at the usual evaluation
    # tolerance and at the tightest one only.
    quad_tolerances: tuple[float, ...] = (1e-5, 1e-8)
    # Maximum number of subintervals quad may split [low, high] into.
    quad_limit: int = 50
    # quad's absolute error target is max(quad_epsabs, 10 * tolerance): a point solve is only
    # accurate to a few times the tolerance, and asking for more makes quad subdivide on solver noise.
    quad_epsabs: float = 1e-6
    # torchdiffeq adaptive method, and its step budget per solve (tight tolerances need many steps).
    method: str = "dopri5"
    max_num_steps: int = 100_000

    def __post_init__(self) -> None:
        object.__setattr__(self, "tolerances", validate_tolerances(self.tolerances))
        _require(_is_number(self.threshold) and self.threshold > 0, "sweep.threshold", self.threshold,
                 "a threshold > 0 on |integral - 1|, for example 1e-3")
        _require(_is_number(self.low), "sweep.low", self.low, "a finite number")
        _require(_is_number(self.high) and self.high > self.low, "sweep.high", self.high,
                 f"a finite number above sweep.low = {self.low}")
        _require(isinstance(self.points, int) and self.points >= 4, "sweep.points", self.points, "an integer >= 4")
        object.__setattr__(self, "quad_tolerances", tuple(self.quad_tolerances))
        if self.quad_tolerances:
            validate_tolerances(self.quad_tolerances, "sweep.quad_tolerances")
        for i, tolerance in enumerate(self.quad_tolerances):
            _require(tolerance in self.tolerances, f"sweep.quad_tolerances[{i}]", tolerance,
                     f"one of sweep.tolerances {list(self.tolerances)}, or set sweep.quad_tolerances = [] to skip quad")
        object.__setattr__(self, "quad_tolerances", tuple(float(v) for v in self.quad_tolerances))
        _require(_is_number(self.quad_epsabs) and self.quad_epsabs > 0, "sweep.quad_epsabs", self.quad_epsabs,
                 "an absolute error target > 0, for example 1e-6")
        _require(isinstance(self.quad_limit, int) and self.quad_limit >= 1, "sweep.quad_limit", self.quad_limit,
                 "an integer >= 1")
        adaptive = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")
        _require(self.method in adaptive, "sweep.method", self.method,
                 f"an adaptive torchdiffeq method, because a fixed grid ignores the tolerance: {', '.join(adaptive)}")
        _require(isinstance(self.max_num_steps, int) and self.max_num_steps >= 1, "sweep.max_num_steps",
                 self.max_num_steps, "an integer >= 1")

    @property
    def cell_width(self) -> float:
        return (self.high - self.low) / self.points


@dataclass(frozen=True)
class DensityCheckConfig:
    """Settings of the whole check, written beside its results as config.toml."""

    seed: int = 0
    mixture: MixtureConfig = field(default_factory=MixtureConfig)
    model: ModelConfig = field(default_factory=lambda: ModelConfig(hidden_dims=(64, 64, 64), num_blocks=1,
                                                                   activation="tanh"))
    # "none" trains p(x); "ccnf" and "infocnf" train p(x | component).
    conditioning: ConditioningConfig = field(default_factory=lambda: ConditioningConfig(method="none"))
    train: DensityTrainConfig = field(default_factory=DensityTrainConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)

    def __post_init__(self) -> None:
        _require(isinstance(self.seed, int) and not isinstance(self.seed, bool) and self.seed >= 0, "seed", self.seed,
                 "an integer >= 0")
        _require(self.model.architecture == "mlp", "model.architecture", self.model.architecture,
                 "mlp, because the mixture data is flat")
        for i, mean in enumerate(self.mixture.means):
            inside = all(self.sweep.low < v < self.sweep.high for v in mean)
            _require(inside, f"mixture.means[{i}]", list(mean),
                     f"a mean inside the grid box [sweep.low, sweep.high] = [{self.sweep.low}, {self.sweep.high}]")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> DensityCheckConfig:
        """Build a config from nested dictionaries. Unknown keys raise ValueError.

        A nested table updates that section's defaults, so a partial [model] table keeps the
        other settings of this check's default model.
        """
        return build_dataclass(cls, raw, _TOML_FORMAT)

    def to_dict(self) -> dict[str, Any]:
        """Return nested plain dictionaries (tuples as lists) suitable for TOML."""
        return config_to_dict(self)

    def model_hash(self) -> str:
        """Short hash of the settings that determine the trained flow (everything but the sweep)."""
        raw = self.to_dict()
        raw.pop("sweep")
        return stable_hash(raw)


def load_density_check_config(path: str | Path) -> DensityCheckConfig:
    """Read a TOML density-check config; a missing file or a bad value raises ValueError naming it."""
    hint = "pass an existing .toml file such as configs/density-check-1d.toml"
    return load_toml_config(path, DensityCheckConfig, hint)


def save_density_check_config(config: DensityCheckConfig, path: str | Path) -> None:
    """Write the resolved config as TOML."""
    save_toml_config(config, path)


def apply_density_check_overrides(config: DensityCheckConfig, overrides: list[str]) -> DensityCheckConfig:
    """Return a copy of ``config`` with ``section.key=value`` overrides applied (values in TOML syntax)."""
    return apply_dotted_overrides(config, overrides, _TOML_FORMAT)
