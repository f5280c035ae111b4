"""Frozen, validating run configuration: data, model, conditioning, solver, tolerance and training."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .toml_config import (
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
    "DataConfig",
    "ModelConfig",
    "ConditioningConfig",
    "ToleranceConfig",
    "SolverConfig",
    "TrainConfig",
    "RunConfig",
    "DATASETS",
    "CONDITIONING_METHODS",
    "TOLERANCE_STRATEGIES",
    "load_config",
    "save_config",
    "config_hash",
    "apply_overrides",
]

DATASETS = ("digits", "mnist", "cifar10")
CONDITIONING_METHODS = ("none", "ccnf", "infocnf")
TOLERANCE_STRATEGIES = ("fixed", "manual", "learned")
_ARCHITECTURES = ("mlp", "multiscale")
_DIVERGENCES = ("hutchinson", "exact")
_PROBES = ("rademacher", "gaussian")
_ADAPTIVE_METHODS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")
_FIXED_GRID_METHODS = ("euler", "midpoint", "heun2", "heun3", "rk4", "explicit_adams", "implicit_adams")

_TOML_FORMAT = ConfigFormat(
    top_table="run",
    unknown_key="unknown setting {where}: the [{table}] table accepts {accepted}",
    unknown_top_key=(
        "unknown setting {key!r}: a run config has the keys {accepted} "
        "(a LatentODE config, which has a [prior] table, is for infocnf latent-ode)"
    ),
    not_a_section="unknown setting {key!r}: {part!r} is not a section of the config",
    override_example="train.lr=1e-3",
)


def _require(condition: bool, section: str, name: str, value: Any, allowed: str) -> None:
    if not condition:
        raise ValueError(f"invalid {section}.{name} = {value!r}: expected {allowed}")


def _require_positive_tolerance(section: str, name: str, value: float) -> None:
    ok = isinstance(value, (int, float)) and math.isfinite(value) and 0 < value < 1
    _require(ok, section, name, value, "a tolerance in (0, 1), for example 1e-5")


@dataclass(frozen=True)
class DataConfig:
    """Dataset choice, where it lives and how it is preprocessed."""

    name: str = "digits"
    data_root: str = ""
    download: bool = False
    # Fraction of the training images held out for model selection.
    val_fraction: float = 0.1
    # Fraction of the digits images held out as the test set (MNIST and CIFAR10 ship their own).
    test_fraction: float = 0.2
    split_seed: int = 0
    # Logit transform x -> logit(alpha + (1 - 2 alpha) x); 1e-6 follows FFJORD.
    alpha: float = 1e-6
    horizontal_flip: bool = True
    # Keep at most this many examples of each split (seeded subset) for quick checks; 0 keeps all.
    max_examples: int = 0

    def __post_init__(self) -> None:
        _require(self.name in DATASETS, "data", "name", self.name, f"one of {', '.join(DATASETS)}")
        _require(0 < self.val_fraction < 0.5, "data", "val_fraction", self.val_fraction, "a fraction in (0, 0.5)")
        _require(0 < self.test_fraction < 0.5, "data", "test_fraction", self.test_fraction, "a fraction in (0, 0.5)")
        _require(0 <= self.alpha < 0.5, "data", "alpha", self.alpha, "a value in [0, 0.5)")
        _require(self.max_examples >= 0, "data", "max_examples", self.max_examples, "an integer >= 0 (0 keeps all)")
        if self.name != "digits":
            _require(
                bool(self.data_root),
                "data",
                "data_root",
                self.data_root,
                f"the folder that holds (or will hold, with download = true) the {self.name} files",
            )


@dataclass(frozen=True)
class ModelConfig:
    """Flow architecture: an MLP field on flat data or a multiscale convolutional flow."""

    architecture: str = "mlp"
    # Hidden widths of each ODE network (MLP layers, or 3x3 convolutions for images).
    hidden_dims: tuple[int, ...] = (64, 64, 64)
    # CNF blocks for the MLP flow; blocks before and after each squeeze for the multiscale flow.
    num_blocks: int = 2
    num_scales: int = 4
    activation: str = "softplus"
    # Learn the end time t1 of each block (initialised at t1).
    train_t1: bool = False
    t1: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "hidden_dims", tuple(self.hidden_dims))
        _require(self.architecture in _ARCHITECTURES, "model", "architecture", self.architecture, "mlp or multiscale")
        _require(
            len(self.hidden_dims) >= 1 and all(isinstance(d, int) and d > 0 for d in self.hidden_dims),
            "model",
            "hidden_dims",
            self.hidden_dims,
            "a non-empty list of positive integers",
        )
        _require(self.num_blocks >= 1, "model", "num_blocks", self.num_blocks, "an integer >= 1")
        _require(self.num_scales >= 1, "model", "num_scales", self.num_scales, "an integer >= 1")
        _require(
            self.activation in ("softplus", "tanh", "elu"), "model", "activation", self.activation, "softplus, tanh or elu"
        )
        _require(self.t1 > 0, "model", "t1", self.t1, "an end time > 0")


@dataclass(frozen=True)
class ConditioningConfig:
    """Label conditioning of the flow: none, CCNF (whole latent) or InfoCNF (supervised part only)."""

    method: str = "infocnf"
    # Share of the latent dimensions that form z_y in InfoCNF.
    supervised_ratio: float = 0.5
    # Weight beta of the cross-entropy term in J = NLL + beta * CE.
    ce_weight: float = 0.5
    classifier_dropout: float = 0.5

    def __post_init__(self) -> None:
        _require(
            self.method in CONDITIONING_METHODS, "conditioning", "method", self.method, "none, ccnf or infocnf"
        )
        _require(
            0 < self.supervised_ratio <= 1,
            "conditioning",
            "supervised_ratio",
            self.supervised_ratio,
            "a fraction in (0, 1]",
        )
        _require(self.ce_weight >= 0, "conditioning", "ce_weight", self.ce_weight, "a weight >= 0")
        _require(
            0 <= self.classifier_dropout < 1,
            "conditioning",
            "classifier_dropout",
            self.classifier_dropout,
            "a probability in [0, 1)",
        )


@dataclass(frozen=True)
class ToleranceConfig:
    """Training-time tolerance strategy; evaluation always uses SolverConfig.eval_tolerance."""

    strategy: str = "fixed"
    # fixed: atol = rtol = value for every block.
    value: float = 1e-5
    # manual: one tolerance per CNF block, in flow order.
    per_block: tuple[float, ...] = ()
    # learned: the gates sample log10 tolerances clamped to [log10_min, log10_max].
    log10_min: float = -8.0
    log10_max: float = -1.0
    log10_init: float = -5.0
    init_log_std: float = -0.5
    gate_hidden: int = 32
    # Adam learning rate of the gate parameters: a gate's output moves about this much in log10
    # tolerance per step, so it is higher than a typical flow learning rate.
    gate_lr: float = 1e-2
    # Optimizer of the gates: "sgd" (momentum 0.9) keeps the step proportional to the REINFORCE
    # gradient, so zero-mean reward noise averages out; Adam rescales noise to full-size steps.
    gate_optimizer: str = "sgd"
    # Weight of the REINFORCE term in the total loss, and the reward scale per NFE.
    reinforce_weight: float = 1.0
    nfe_reward_scale: float = 0.01
    discount: float = 1.0
    # Add the detached task loss as a terminal reward (negative), scaled by this weight; 0 disables it.
    task_reward_weight: float = 0.0
    # Momentum of the moving-average baseline subtracted from each return.
    baseline_momentum: float = 0.9

    def __post_init__(self) -> None:
        object.__setattr__(self, "per_block", tuple(float(v) for v in self.per_block))
        section = "solver.tolerance"
        _require(
            self.strategy in TOLERANCE_STRATEGIES, section, "strategy", self.strategy, "fixed, manual or learned"
        )
        _require_positive_tolerance(section, "value", self.value)
        for i, tol in enumerate(self.per_block):
            _require_positive_tolerance(section, f"per_block[{i}]", tol)
        if self.strategy == "manual":
            _require(len(self.per_block) > 0, section, "per_block", list(self.per_block), "one tolerance per CNF block")
        _require(
            self.log10_min < self.log10_max,
            section,
            "log10_min",
            self.log10_min,
            f"a value below log10_max = {self.log10_max}",
        )
        _require(self.log10_max < 0, section, "log10_max", self.log10_max, "a value < 0 (tolerance below 1)")
        _require(
            self.log10_min <= self.log10_init <= self.log10_max,
            section,
            "log10_init",
            self.log10_init,
            f"a value in [log10_min, log10_max] = [{self.log10_min}, {self.log10_max}]",
        )
        _require(self.gate_hidden >= 1, section, "gate_hidden", self.gate_hidden, "an integer >= 1")
        _require(self.gate_lr > 0, section, "gate_lr", self.gate_lr, "a learning rate > 0")
        _require(self.gate_optimizer in ("sgd", "adam"), section, "gate_optimizer", self.gate_optimizer, "sgd or adam")
        _require(self.reinforce_weight >= 0, section, "reinforce_weight", self.reinforce_weight, "a weight >= 0")
        _require(self.nfe_reward_scale > 0, section, "nfe_reward_scale", self.nfe_reward_scale, "a scale > 0")
        _require(0 < self.discount <= 1, section, "discount", self.discount, "a discount in (0, 1]")
        _require(self.task_reward_weight >= 0, section, "task_reward_weight", self.task_reward_weight, "a weight >= 0")
        _require(
            0 <= self.baseline_momentum < 1,
            section,
            "baseline_momentum",
            self.baseline_momentum,
            "a momentum in [0, 1)",
        )


@dataclass(frozen=True)
class SolverConfig:
    """ODE solver, divergence estimator and evaluation tolerances."""

    method: str = "dopri5"
    adjoint: bool = False
    divergence: str = "hutchinson"
    probe: str = "rademacher"
    # Attempted steps allowed per solve before it fails with status "step_budget_exceeded".
    max_num_steps: int = 1000
    # Step size of fixed-grid methods (euler, rk4, ...), in units of t.
    step_size: float = 0.05
    eval_tolerance: float = 1e-5
    extra_eval_tolerances: tuple[float, ...] = (1e-6, 1e-7, 1e-8)
    tolerance: ToleranceConfig = field(default_factory=ToleranceConfig)

    def __post_init__(self) -> None:
        if isinstance(self.tolerance, dict):
            object.__setattr__(self, "tolerance", build_dataclass(ToleranceConfig, self.tolerance, _TOML_FORMAT, "solver.tolerance"))
        object.__setattr__(self, "extra_eval_tolerances", tuple(float(v) for v in self.extra_eval_tolerances))
        methods = _ADAPTIVE_METHODS + _FIXED_GRID_METHODS
        _require(self.method in methods, "solver", "method", self.method, f"a torchdiffeq method: {', '.join(methods)}")
        _require(self.divergence in _DIVERGENCES, "solver", "divergence", self.divergence, "hutchinson or exact")
        _require(self.probe in _PROBES, "solver", "probe", self.probe, "rademacher or gaussian")
        _require(self.max_num_steps >= 1, "solver", "max_num_steps", self.max_num_steps, "an integer >= 1")
        _require(self.step_size > 0, "solver", "step_size", self.step_size, "a step size > 0")
        _require_positive_tolerance("solver", "eval_tolerance", self.eval_tolerance)
        for i, tol in enumerate(self.extra_eval_tolerances):
            _require_positive_tolerance("solver", f"extra_eval_tolerances[{i}]", tol)

    @property
    def adaptive(self) -> bool:
        """Whether the method chooses its own steps (and so honours atol and rtol)."""
        return self.method in _ADAPTIVE_METHODS


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation: Adam, learning-rate schedule, clipping, budget and checkpoints."""

    epochs: int = 60
    batch_size: int = 64
    eval_batch_size: int = 500
    lr: float = 1e-3
    weight_decay: float = 0.0
    # Linear warm-up from 0 to lr over this many iterations.
    warmup_iters: int = 0
    # Multiply the learning rate by lr_decay_factor at the start of each listed epoch.
    lr_decay_epochs: tuple[int, ...] = ()
    lr_decay_factor: float = 0.1
    # Clip the global gradient norm; 0 disables clipping.
    grad_clip: float = 100.0
    # Evaluate on the validation split every this many epochs (and after the last one).
    eval_every: int = 1
    checkpoint_every: int = 1
    # Stop a run whose training loss is not finite or exceeds this value.
    divergence_threshold: float = 1e6
    # Wall-clock limit for the run in seconds; 0 means none.
    time_limit_s: float = 0.0
    device: str = "auto"
    # torch intra-op threads for the run; 0 keeps torch's default (one per core). Small CPU
    # models run best on 1, and two busy processes with 2 threads each oversubscribe 2 cores.
    num_threads: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "lr_decay_epochs", tuple(int(e) for e in self.lr_decay_epochs))
        _require(self.epochs >= 1, "train", "epochs", self.epochs, "an integer >= 1")
        _require(self.batch_size >= 1, "train", "batch_size", self.batch_size, "an integer >= 1")
        _require(self.eval_batch_size >= 1, "train", "eval_batch_size", self.eval_batch_size, "an integer >= 1")
        _require(
            isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0,
            "train",
            "lr",
            self.lr,
            "a learning rate > 0, for example 1e-3",
        )
        _require(self.weight_decay >= 0, "train", "weight_decay", self.weight_decay, "a value >= 0")
        _require(self.warmup_iters >= 0, "train", "warmup_iters", self.warmup_iters, "an integer >= 0")
        _require(
            list(self.lr_decay_epochs) == sorted(set(self.lr_decay_epochs)) and all(e >= 1 for e in self.lr_decay_epochs),
            "train",
            "lr_decay_epochs",
            list(self.lr_decay_epochs),
            "strictly increasing epochs >= 1",
        )
        _require(0 < self.lr_decay_factor <= 1, "train", "lr_decay_factor", self.lr_decay_factor, "a factor in (0, 1]")
        _require(self.grad_clip >= 0, "train", "grad_clip", self.grad_clip, "a norm >= 0 (0 disables clipping)")
        _require(self.eval_every >= 1, "train", "eval_every", self.eval_every, "an integer >= 1")
        _require(self.checkpoint_every >= 1, "train", "checkpoint_every", self.checkpoint_every, "an integer >= 1")
        _require(self.divergence_threshold > 0, "train", "divergence_threshold", self.divergence_threshold, "a value > 0")
        _require(self.time_limit_s >= 0, "train", "time_limit_s", self.time_limit_s, "seconds >= 0 (0 for no limit)")
        _require(self.num_threads >= 0, "train", "num_threads", self.num_threads, "an integer >= 0 (0 for torch's default)")
        _require(
            self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
            "train",
            "device",
            self.device,
            "auto, cpu or cuda[:N]",
        )


@dataclass(frozen=True)
class RunConfig:
    """Everything one training run needs; written beside its results as config.toml."""

    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    conditioning: ConditioningConfig = field(default_factory=ConditioningConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        _require(isinstance(self.seed, int) and self.seed >= 0, "run", "seed", self.seed, "an integer >= 0")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunConfig:
        """Build a config from nested dictionaries, rejecting unknown keys."""
        return build_dataclass(cls, raw, _TOML_FORMAT)

    def to_dict(self) -> dict[str, Any]:
        """Return nested plain dictionaries (tuples as lists) suitable for TOML."""
        return config_to_dict(self)

    def flat(self) -> dict[str, Any]:
        """Return the config as dotted keys, for example ``solver.tolerance.value``."""
        return flatten(self.to_dict())


def load_config(path: str | Path) -> RunConfig:
    """Read a TOML run config; a missing file or a bad value raises ValueError naming it."""
    return load_toml_config(path, RunConfig, "pass an existing .toml file (see configs/ for examples)")


def save_config(config: RunConfig, path: str | Path) -> None:
    """Write the resolved config as TOML."""
    save_toml_config(config, path)


def config_hash(config: RunConfig) -> str:
    """Return a short stable hash of the resolved config, used to match finished runs."""
    return stable_hash(config.to_dict())


def apply_overrides(config: RunConfig, overrides: list[str] | dict[str, Any]) -> RunConfig:
    """Return a copy of config with dotted-key overrides applied.

    ``overrides`` is a list of ``"section.key=value"`` strings (values in TOML syntax) or a
    mapping of dotted keys to values.
    """
    return apply_dotted_overrides(config, overrides, _TOML_FORMAT)
