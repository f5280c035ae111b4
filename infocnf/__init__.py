"""infocnf: a benchmark and ablation harness for conditional continuous normalizing flows."""

from .conditioning import ConditioningHead
from .config import (
    ConditioningConfig,
    DataConfig,
    ModelConfig,
    RunConfig,
    SolverConfig,
    ToleranceConfig,
    TrainConfig,
    apply_overrides,
    config_hash,
    load_config,
    save_config,
)
from .data import DataSplits, Split, load_splits
from .evaluate import evaluate
from .flows import CNFBlock, FlatCNF, MultiscaleCNF, build_flow
from .metrics import bits_per_dim
from .model import ConditionalCNF, ModelOutput, build_model
from .solve import SolveError, SolveOptions, SolveResult, SolveStats, solve_cnf
from .tolerance import FixedPolicy, LearnedPolicy, ManualPolicy, build_policy
from .train import Trainer, TrainResult, train_run

__all__ = [
    "CNFBlock",
    "ConditionalCNF",
    "ConditioningConfig",
    "ConditioningHead",
    "DataConfig",
    "DataSplits",
    "FixedPolicy",
    "FlatCNF",
    "LearnedPolicy",
    "ManualPolicy",
    "ModelConfig",
    "ModelOutput",
    "MultiscaleCNF",
    "RunConfig",
    "SolveError",
    "SolveOptions",
    "SolveResult",
    "SolveStats",
    "SolverConfig",
    "Split",
    "ToleranceConfig",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "apply_overrides",
    "bits_per_dim",
    "build_flow",
    "build_model",
    "build_policy",
    "config_hash",
    "evaluate",
    "load_config",
    "load_splits",
    "save_config",
    "solve_cnf",
    "train_run",
]
