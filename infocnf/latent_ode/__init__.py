"""LatentODE on bi-directional spirals, with an N(0, I) or a direction-partitioned latent prior."""

from .config import (
    LATENT_PRIORS,
    LatentModelConfig,
    LatentODEConfig,
    LatentPriorConfig,
    LatentSolverConfig,
    LatentTrainConfig,
    SpiralConfig,
    apply_latent_ode_overrides,
    load_latent_ode_config,
    save_latent_ode_config,
)
from .figures import TrajectorySet, load_trajectories, plot_trajectories, predict_trajectories, save_trajectories
from .model import LatentODE, LatentODEOutput, gaussian_kl, observation_log_likelihood, solve_latent
from .spirals import CLOCKWISE, COUNTER_CLOCKWISE, SPIRAL_PRESETS, SpiralSet, SpiralSplits, generate_spirals, make_spiral_splits
from .train import LatentODETrainer, evaluate_latent_ode, load_latent_ode, probe_direction_error, run_latent_ode, solve_options

__all__ = [
    "CLOCKWISE",
    "COUNTER_CLOCKWISE",
    "LATENT_PRIORS",
    "LatentModelConfig",
    "LatentODE",
    "LatentODEConfig",
    "LatentODEOutput",
    "LatentODETrainer",
    "LatentPriorConfig",
    "LatentSolverConfig",
    "LatentTrainConfig",
    "SPIRAL_PRESETS",
    "SpiralConfig",
    "SpiralSet",
    "SpiralSplits",
    "TrajectorySet",
    "apply_latent_ode_overrides",
    "evaluate_latent_ode",
    "gaussian_kl",
    "generate_spirals",
    "load_latent_ode",
    "load_latent_ode_config",
    "load_trajectories",
    "make_spiral_splits",
    "observation_log_likelihood",
    "plot_trajectories",
    "predict_trajectories",
    "probe_direction_error",
    "run_latent_ode",
    "save_latent_ode_config",
    "save_trajectories",
    "solve_latent",
    "solve_options",
]
