"""Tests of config validation (each bad value names its field), overrides and TOML round trips."""

from pathlib import Path

import pytest

from infocnf.config import (
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
from infocnf.tolerance import build_policy

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# name: (call that must raise, regular expression the message must match)
BAD_VALUES = {
    "tolerance-zero": (lambda: ToleranceConfig(value=0.0), r"solver\.tolerance\.value = 0\.0"),
    "tolerance-negative": (lambda: ToleranceConfig(value=-1e-5), r"solver\.tolerance\.value = -1e-05"),
    "tolerance-per-block-zero": (
        lambda: ToleranceConfig(strategy="manual", per_block=(1e-4, 0.0)),
        r"solver\.tolerance\.per_block\[1\] = 0\.0",
    ),
    "manual-empty": (lambda: ToleranceConfig(strategy="manual"), r"solver\.tolerance\.per_block = \[\]"),
    "eval-tolerance-zero": (lambda: SolverConfig(eval_tolerance=0.0), r"solver\.eval_tolerance = 0\.0"),
    "extra-eval-tolerance-negative": (
        lambda: SolverConfig(extra_eval_tolerances=(1e-6, -1e-7)),
        r"solver\.extra_eval_tolerances\[1\] = -1e-07",
    ),
    "clamp-min-equals-max": (
        lambda: ToleranceConfig(log10_min=-3.0, log10_max=-3.0, log10_init=-3.0),
        r"solver\.tolerance\.log10_min = -3\.0: expected a value below log10_max = -3\.0",
    ),
    "clamp-min-above-max": (
        lambda: ToleranceConfig(log10_min=-2.0, log10_max=-4.0, log10_init=-3.0),
        r"solver\.tolerance\.log10_min = -2\.0",
    ),
    "learning-rate-zero": (lambda: TrainConfig(lr=0.0), r"train\.lr = 0\.0: expected a learning rate > 0"),
    "unknown-dataset": (lambda: DataConfig(name="svhn"), r"data\.name = 'svhn': expected one of digits, mnist, cifar10"),
    "mnist-without-root": (lambda: DataConfig(name="mnist"), r"data\.data_root = ''"),
    "unknown-architecture": (lambda: ModelConfig(architecture="resnet"), r"model\.architecture = 'resnet'"),
    "unknown-conditioning": (lambda: ConditioningConfig(method="cgan"), r"conditioning\.method = 'cgan'"),
    "unknown-solver-method": (lambda: SolverConfig(method="rk45"), r"solver\.method = 'rk45'"),
    "unknown-key": (
        lambda: RunConfig.from_dict({"train": {"learning_rate": 1e-3}}),
        r"unknown setting train\.learning_rate",
    ),
    "unknown-nested-key": (
        lambda: RunConfig.from_dict({"solver": {"tolerance": {"stratgy": "fixed"}}}),
        r"unknown setting solver\.tolerance\.stratgy",
    ),
    "wrong-type": (lambda: RunConfig.from_dict({"train": {"epochs": "ten"}}), r"train\.epochs = 'ten': expected an integer"),
    "manual-wrong-length": (
        lambda: build_policy(ToleranceConfig(strategy="manual", per_block=(1e-4, 1e-5)), [(64,)] * 3),
        r"solver\.tolerance\.per_block: 2 tolerances for a model with 3 CNF blocks",
    ),
    "override-unknown-key": (
        lambda: apply_overrides(RunConfig(), ["train.learning_rate=1e-3"]),
        r"unknown setting 'train\.learning_rate'",
    ),
    "override-unknown-section": (
        lambda: apply_overrides(RunConfig(), {"trainer.lr": 1e-3}),
        r"unknown setting 'trainer\.lr': 'trainer' is not a section",
    ),
    "override-without-value": (lambda: apply_overrides(RunConfig(), ["train.lr"]), r"invalid override 'train\.lr'"),
    "override-bad-value": (lambda: apply_overrides(RunConfig(), ["train.lr=0"]), r"train\.lr = 0\.0"),
}


@pytest.mark.parametrize("case", BAD_VALUES)
def test_config_bad_value_names_field(case):
    make, message = BAD_VALUES[case]
    with pytest.raises(ValueError, match=message):
        make()


def test_load_config_missing_file(tmp_path):
    path = tmp_path / "absent.toml"
    with pytest.raises(ValueError, match="config file not found: .*absent.toml"):
        load_config(path)


def test_load_config_bad_value_names_file_and_field(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[train]\nlr = 0\n")
    with pytest.raises(ValueError, match=r"bad\.toml: invalid train\.lr = 0\.0"):
        load_config(path)


def test_load_config_invalid_toml(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("[train\nlr = 1\n")
    with pytest.raises(ValueError, match="invalid TOML in .*broken.toml"):
        load_config(path)


def test_config_save_load_round_trip(tmp_path):
    config = RunConfig(
        seed=3,
        data=DataConfig(name="mnist", data_root="data/mnist", val_fraction=0.2),
        model=ModelConfig(architecture="multiscale", hidden_dims=(32, 32), num_blocks=1, num_scales=3, train_t1=True),
        conditioning=ConditioningConfig(method="ccnf", ce_weight=1.0),
        solver=SolverConfig(
            probe="gaussian",
            extra_eval_tolerances=(1e-6,),
            tolerance=ToleranceConfig(strategy="manual", per_block=(1e-3, 1e-4, 1e-5)),
        ),
        train=TrainConfig(epochs=5, lr=2e-3, lr_decay_epochs=(2, 4), warmup_iters=10),
    )
    path = tmp_path / "config.toml"
    save_config(config, path)
    loaded = load_config(path)
    assert loaded == config
    assert config_hash(loaded) == config_hash(config)


@pytest.mark.parametrize("name", ["digits-infocnf.toml", "cifar10-infocnf.toml"])
def test_config_shipped_files_load(name):
    config = load_config(CONFIGS / name)
    assert config.conditioning.method == "infocnf"


def test_apply_overrides_values():
    config = apply_overrides(
        RunConfig(), ["train.lr=1e-2", "conditioning.method=ccnf", "model.hidden_dims=[8, 8]", "solver.adjoint=true"]
    )
    assert config.train.lr == 0.01
    assert config.conditioning.method == "ccnf"
    assert config.model.hidden_dims == (8, 8)
    assert config.solver.adjoint is True
    nested = apply_overrides(RunConfig(), {"solver.tolerance.value": 1e-4})
    assert nested.solver.tolerance.value == 1e-4
