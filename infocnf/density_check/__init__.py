"""Density validity check: does the flow's density integrate to one at each solver tolerance?"""

from .config import (
    DensityCheckConfig,
    DensityTrainConfig,
    MixtureConfig,
    SweepConfig,
    apply_density_check_overrides,
    load_density_check_config,
    save_density_check_config,
    validate_tolerances,
)
from .model import DensityModel, load_or_train_density_model, mixture_log_prob, sample_mixture, train_density_model
from .outputs import format_sweep_markdown, format_verdict, plot_sweep, write_sweep_outputs
from .sweep import (
    SWEEP_COLUMNS,
    choose_verdict_tolerance,
    grid_points,
    quad_integral,
    riemann_log_integral,
    sweep_tolerances,
)

__all__ = [
    "SWEEP_COLUMNS",
    "DensityCheckConfig",
    "DensityModel",
    "DensityTrainConfig",
    "MixtureConfig",
    "SweepConfig",
    "apply_density_check_overrides",
    "choose_verdict_tolerance",
    "format_sweep_markdown",
    "format_verdict",
    "grid_points",
    "load_density_check_config",
    "load_or_train_density_model",
    "mixture_log_prob",
    "plot_sweep",
    "quad_integral",
    "riemann_log_integral",
    "sample_mixture",
    "save_density_check_config",
    "sweep_tolerances",
    "train_density_model",
    "validate_tolerances",
    "write_sweep_outputs",
]
