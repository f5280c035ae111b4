"""Frozen, validating configuration of a LatentODE run on spirals: data, model, latent prior, solver, training."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..toml_config import (
    ConfigFormat,
    apply_dotted_overrides,
    build_dataclass,
    config_to_dict,
    flatten,
    load_toml_config,
    save_toml_config,
    stable_hash,
)

__all__ = [
    "SpiralConfig",
    "LatentModelConfig",
    "LatentPriorConfig",
    "LatentSolverConfig",
    "LatentTrainConfig",
    "LatentODEConfig",
    "LATENT_PRIORS",
    "load_latent_ode_config",
    "save_latent_ode_config",
    "apply_latent_ode_overrides",
]

# "none": z0 ~ N(0, I). "partitioned": z0 = [z_y, z_u] with a direction-conditional prior on z_y.
LATENT_PRIORS = ("none", "partitioned")
_ADAPTIVE_METHODS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")
_ACTIVATIONS = ("softplus", "tanh", "elu")

# Messages call the top-level table [run], so an unknown top-level key reads "run.key".
_TOML_FORMAT = ConfigFormat(
    top_table="run",
    unknown_key="unknown setting {table}.{key}: the [{table}] table accepts {accepted}",
    unknown_top_key=(
        "unknown setting {key!r}: a LatentODE config has the keys {accepted} "
        "(a CNF run config, which has a [conditioning] table, is for infocnf train)"
    ),
    not_a_section="unknown setting {key!r}: {part!r} is not a section; sections are {sections}",
    override_example="prior.method=none",
)


def _require(condition: bool, section: str, name: str, value: Any, allowed: str) -> None:
    if not condition:
        raise ValueError(f"invalid {section}.{name} = {value!r}: expected {allowed}")


def _require_tolerance(section: str, name: str, value: float) -> None:
    ok = isinstance(value, (int, float)) and math.isfinite(value) and 0 < value < 1
    _require(ok, section, name, value, "a tolerance in (0, 1), for example 1e-5")


def _require_widths(section: str, name: str, value: tuple[int, ...]) -> None:
    ok = len(value) >= 1 and all(isinstance(d, int) and d > 0 for d in value)
    _require(ok, section, name, list(value), "a non-empty list of positive integers")


@dataclass(frozen=True)
class SpiralConfig:
    """Spiral data set: sizes, time grid, observed window, radius ranges and noise.

    Each spiral is r(t) (cos theta(t), sin theta(t)) with r(t) = r0 + growth * t and
    theta(t) = phase + direction * t, so the angular speed is 1 rad per time unit.
    """

    num_train: int = 400
    num_val: int = 100
    num_test: int = 200
    # Points of the full noise-free trajectory, equally spaced on [0, t1].
    grid_points: int = 1000
    # End of the grid in time units. At 1 rad per time unit, 6 pi is three turns.
    t1: float = 6 * math.pi
    # Consecutive grid points observed (with noise) per spiral.
    window_points: int = 200
    # Grid points scored after the window (forward) and before it (backward).
    extrapolate_points: int = 100
    # Ranges of r0 (radius at t = 0) and growth (radius units per time unit), drawn uniformly per spiral.
    radius_min: float = 0.5
    radius_max: float = 1.5
    growth_min: float = 0.2
    growth_max: float = 0.4
    # Standard deviation of the Gaussian noise added to the observed points.
    noise_std: float = 0.3
    seed: int = 0

    def __post_init__(self) -> None:
        s = "data"
        _require(self.num_train >= 2, s, "num_train", self.num_train, "an integer >= 2 (one spiral per direction)")
        _require(self.num_val >= 2, s, "num_val", self.num_val, "an integer >= 2 (one spiral per direction)")
        _require(self.num_test >= 2, s, "num_test", self.num_test, "an integer >= 2 (one spiral per direction)")
        _require(self.window_points >= 2, s, "window_points", self.window_points, "an integer >= 2")
        _require(self.extrapolate_points >= 1, s, "extrapolate_points", self.extrapolate_points, "an integer >= 1")
        needed = self.window_points + 2 * self.extrapolate_points
        _require(
            self.grid_points >= needed,
            s,
            "grid_points",
            self.grid_points,
            f"at least window_points + 2 * extrapolate_points = {needed}",
        )
        _require(math.isfinite(self.t1) and self.t1 > 0, s, "t1", self.t1, "an end time > 0")
        _require(self.radius_min >= 0, s, "radius_min", self.radius_min, "a radius >= 0")
        _require(self.radius_max >= self.radius_min, s, "radius_max", self.radius_max, f">= radius_min = {self.radius_min}")
        _require(self.growth_min >= 0, s, "growth_min", self.growth_min, "a growth rate >= 0")
        _require(self.growth_max >= self.growth_min, s, "growth_max", self.growth_max, f">= growth_min = {self.growth_min}")
        _require(self.noise_std >= 0, s, "noise_std", self.noise_std, "a standard deviation >= 0")
        _require(self.seed >= 0, s, "seed", self.seed, "an integer >= 0")

    @property
    def dt(self) -> float:
        """Time between neighbouring grid points."""
        return self.t1 / (self.grid_points - 1)


@dataclass(frozen=True)
class LatentModelConfig:
    """LatentODE sizes: recognition GRU, latent ODE network, decoder and observation noise."""

    latent_dim: int = 6
    # Hidden size of the GRU that reads the window backwards in time.
    encoder_hidden: int = 32
    ode_hidden_dims: tuple[int, ...] = (32, 32)
    decoder_hidden_dims: tuple[int, ...] = (32,)
    activation: str = "elu"
    # Standard deviation of the Gaussian observation model p(x | z), set to the data noise by default.
    observation_std: float = 0.3

    def __post_init__(self) -> None:
        object.__setattr__(self, "ode_hidden_dims", tuple(self.ode_hidden_dims))
        object.__setattr__(self, "decoder_hidden_dims", tuple(self.decoder_hidden_dims))
        s = "model"
        _require(self.latent_dim >= 2, s, "latent_dim", self.latent_dim, "an integer >= 2 (room for z_y and z_u)")
        _require(self.encoder_hidden >= 1, s, "encoder_hidden", self.encoder_hidden, "an integer >= 1")
        _require_widths(s, "ode_hidden_dims", self.ode_hidden_dims)
        _require_widths(s, "decoder_hidden_dims", self.decoder_hidden_dims)
        _require(self.activation in _ACTIVATIONS, s, "activation", self.activation, "softplus, tanh or elu")
        ok = math.isfinite(self.observation_std) and self.observation_std > 0
        _require(ok, s, "observation_std", self.observation_std, "a standard deviation > 0")


@dataclass(frozen=True)
class LatentPriorConfig:
    """Prior over z0: N(0, I) for "none", or a direction-conditional z_y and an N(0, I) z_u for "partitioned"."""

    method: str = "partitioned"
    # Share of latent_dim that forms z_y (rounded, at least 1, at most latent_dim - 1).
    supervised_ratio: float = 0.5
    # Weight beta of the cross-entropy in loss = -ELBO per observed value + beta * CE. At 0.5 (the
    # InfoCNF image setting) the ELBO's gradient on the encoder was about 27x the CE's at
    # initialisation, and the classifier stayed at chance for 20 epochs on the quick preset.
    ce_weight: float = 5.0
    classifier_dropout: float = 0.0

    def __post_init__(self) -> None:
        s = "prior"
        _require(self.method in LATENT_PRIORS, s, "method", self.method, "none or partitioned")
        _require(0 < self.supervised_ratio < 1, s, "supervised_ratio", self.supervised_ratio, "a fraction in (0, 1)")
        _require(self.ce_weight >= 0, s, "ce_weight", self.ce_weight, "a weight >= 0")
        _require(
            0 <= self.classifier_dropout < 1, s, "classifier_dropout", self.classifier_dropout, "a probability in [0, 1)"
        )


@dataclass(frozen=True)
class LatentSolverConfig:
    """torchdiffeq method and explicit tolerances for training and for evaluation solves."""

    method: str = "dopri5"
    rtol: float = 1e-4
    atol: float = 1e-5
    eval_rtol: float = 1e-5
    eval_atol: float = 1e-6
    # Attempted steps allowed per solve before it fails with status "step_budget_exceeded".
    max_num_steps: int = 2000

    def __post_init__(self) -> None:
        s = "solver"
        methods = ", ".join(_ADAPTIVE_METHODS)
        _require(self.method in _ADAPTIVE_METHODS, s, "method", self.method, f"an adaptive torchdiffeq method: {methods}")
        for name in ("rtol", "atol", "eval_rtol", "eval_atol"):
            _require_tolerance(s, name, getattr(self, name))
        _require(self.max_num_steps >= 1, s, "max_num_steps", self.max_num_steps, "an integer >= 1")


@dataclass(frozen=True)
class LatentTrainConfig:
    """Optimisation with Adam, evaluation cadence and outputs."""

    epochs: int = 20
    batch_size: int = 50
    eval_batch_size: int = 200
    lr: float = 2e-2
    # Multiply the learning rate by lr_decay_factor once each listed number of epochs has completed.
    lr_decay_epochs: tuple[int, ...] = (14,)
    lr_decay_factor: float = 0.3
    # Maximum global gradient norm; 0 disables clipping.
    grad_clip: float = 10.0
    # Evaluate on the validation split every this many epochs (and after the last one).
    eval_every: int = 2
    # Stop a run whose training loss is not finite or exceeds this value.
    divergence_threshold: float = 1e6
    # Test spirals, alternately clockwise and counter-clockwise, saved to trajectories.npz for the figure.
    trajectory_spirals: int = 6
    device: str = "cpu"
    # torch CPU threads during the run, or 0 to keep torch's setting. This model's tensors are small,
    # so one thread is fastest. On a loaded 2-core machine, two threads ran the GRU about 100x slower.
    num_threads: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "lr_decay_epochs", tuple(int(e) for e in self.lr_decay_epochs))
        s = "train"
        _require(self.epochs >= 1, s, "epochs", self.epochs, "an integer >= 1")
        _require(self.batch_size >= 1, s, "batch_size", self.batch_size, "an integer >= 1")
        _require(self.eval_batch_size >= 1, s, "eval_batch_size", self.eval_batch_size, "an integer >= 1")
        ok = math.isfinite(self.lr) and self.lr > 0
        _require(ok, s, "lr", self.lr, "a learning rate > 0, for example 1e-3")
        decays = list(self.lr_decay_epochs)
        ok = decays == sorted(set(decays)) and all(e >= 1 for e in decays)
        _require(ok, s, "lr_decay_epochs", decays, "strictly increasing epochs >= 1")
        _require(0 < self.lr_decay_factor <= 1, s, "lr_decay_factor", self.lr_decay_factor, "a factor in (0, 1]")
        _require(self.grad_clip >= 0, s, "grad_clip", self.grad_clip, "a norm >= 0 (0 disables clipping)")
        _require(self.eval_every >= 1, s, "eval_every", self.eval_every, "an integer >= 1")
        _require(self.divergence_threshold > 0, s, "divergence_threshold", self.divergence_threshold, "a value > 0")
        _require(self.trajectory_spirals >= 0, s, "trajectory_spirals", self.trajectory_spirals, "an integer >= 0")
        _require(self.num_threads >= 0, s, "num_threads", self.num_threads, "an integer >= 0 (0 keeps torch's setting)")
        ok = self.device in ("auto", "cpu") or self.device.startswith("cuda")
        _require(ok, s, "device", self.device, "auto, cpu or cuda[:N]")


@dataclass(frozen=True)
class LatentODEConfig:
    """Everything one LatentODE run needs; written beside its results as config.toml."""

    seed: int = 0
    data: SpiralConfig = field(default_factory=SpiralConfig)
    model: LatentModelConfig = field(default_factory=LatentModelConfig)
    prior: LatentPriorConfig = field(default_factory=LatentPriorConfig)
    solver: LatentSolverConfig = field(default_factory=LatentSolverConfig)
    train: LatentTrainConfig = field(default_factory=LatentTrainConfig)

    def __post_init__(self) -> None:
        _require(isinstance(self.seed, int) and self.seed >= 0, "run", "seed", self.seed, "an integer >= 0")
        if self.train.trajectory_spirals > self.data.num_test:
            raise ValueError(
                f"invalid train.trajectory_spirals = {self.train.trajectory_spirals}: expected at most "
                f"data.num_test = {self.data.num_test}; lower it or raise data.num_test"
            )

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> LatentODEConfig:
        """Build a config from nested dictionaries, rejecting unknown keys."""
        return build_dataclass(cls, raw, _TOML_FORMAT)

    def to_dict(self) -> dict[str, Any]:
        """Return nested plain dictionaries (tuples as lists) suitable for TOML."""
        return config_to_dict(self)

    def flat(self) -> dict[str, Any]:
        """Return the config as dotted keys, for example ``solver.rtol``."""
        return flatten(self.to_dict())

    def hash(self) -> str:
        """Return a short stable hash of the resolved config."""
        return stable_hash(self.to_dict())


def load_latent_ode_config(path: str | Path) -> LatentODEConfig:
    """Read a TOML LatentODE config; a missing file or a bad value raises ValueError naming it."""
    return load_toml_config(path, LatentODEConfig, "pass an existing .toml file such as configs/latent-ode-quick.toml")


def save_latent_ode_config(config: LatentODEConfig, path: str | Path) -> None:
    """Write the resolved config as TOML."""
    save_toml_config(config, path)


def apply_latent_ode_overrides(config: LatentODEConfig, overrides: list[str] | dict[str, Any]) -> LatentODEConfig:
    """Return a copy of config with dotted-key overrides such as ``"prior.method=none"`` applied.

    ``overrides`` is a list of ``"section.key=value"`` strings (values in TOML syntax) or a
    mapping of dotted keys to values.
    """
    return apply_dotted_overrides(config, overrides, _TOML_FORMAT)
