"""Tests for the Optuna tolerance search and the tune-tolerance command."""

import math
from dataclasses import replace
import tomllib
from pathlib import Path

import optuna
import pandas as pd
import pytest
import torch

from infocnf.cli import main
from infocnf.config import ModelConfig, RunConfig, apply_overrides, load_config
from infocnf.flows import MultiscaleCNF
from infocnf.tolerance import ManualPolicy
from infocnf.tuning import TuneConfig, choose_trial, tolerance_groups, tune_tolerance

DIGITS_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "digits-infocnf.toml"

# A tiny InfoCNF on digits: 2 MLP blocks of width 8, 5 iterations per epoch.
TINY = {"model.hidden_dims": [8], "train.batch_size": 256}


@pytest.fixture
def one_thread():
    # Tiny models gain nothing from intra-op threads, which wait on each other on a busy machine.
    # The previous count is restored for the tests that follow.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_config(**overrides) -> RunConfig:
    return apply_overrides(load_config(DIGITS_CONFIG), {**TINY, **overrides})


def test_tolerance_groups_mlp_one_per_block():
    groups = tolerance_groups(ModelConfig(architecture="mlp", num_blocks=3))
    assert [g.name for g in groups] == ["block_0", "block_1", "block_2"]
    assert [g.blocks for g in groups] == [(0,), (1,), (2,)]


@pytest.mark.parametrize("num_scales,num_blocks", [(1, 1), (2, 1), (3, 2)])
def test_tolerance_groups_multiscale_match_flow(num_scales, num_blocks):
    model = ModelConfig(architecture="multiscale", num_scales=num_scales, num_blocks=num_blocks, hidden_dims=(4,))
    flow = MultiscaleCNF((1, 8, 8), model)
    groups = tolerance_groups(model)
    assert [g.name for g in groups] == [f"scale_{s}" for s in range(num_scales)]
    assert [b for g in groups for b in g.blocks] == list(range(len(flow.block_shapes)))
    for scale, group in enumerate(groups):
        before, after = flow._scale_blocks(scale)
        assert group.blocks == (*before, *after)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"trials": 0}, r"invalid trials = 0"),
        ({"trials": 2, "log10_min": -2.0, "log10_max": -3.0}, r"log10_min = -2.0 is not below log10_max = -3.0"),
        ({"trials": 2, "log10_min": -3.0, "log10_max": -3.0}, r"log10_min = -3.0 is not below"),
        ({"trials": 2, "log10_max": 0.0}, r"invalid log10_max = 0.0"),
        ({"trials": 2, "log10_min": math.nan}, r"invalid log10_min = nan"),
        ({"trials": 2, "epochs": 0}, r"invalid epochs = 0"),
        ({"trials": 2, "bpd_slack": -0.1}, r"invalid bpd_slack = -0.1"),
        ({"trials": 2, "study_name": " "}, r"invalid study_name"),
        ({"trials": 2, "storage": "study.db"}, r"expected a database URL"),
    ],
)
def test_tune_config_rejects_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TuneConfig(**kwargs)


def test_choose_trial_selection_rule():
    frame = pd.DataFrame(
        {
            "trial": [0, 1, 2, 3],
            "val_bits_per_dim": [3.00, 3.02, 3.05, 3.01],
            "train_nfe_forward": [100.0, 60.0, 40.0, 200.0],
            "pareto": [True, True, True, False],
        }
    )
    # Threshold 3.00 * 1.01 = 3.03 admits trials 0 and 1; trial 1 has the lower NFE.
    assert choose_trial(frame, 0.01) == 1
    assert choose_trial(frame, 0.0) == 0
    # Threshold 3.06 admits trial 2 as well.
    assert choose_trial(frame, 0.02) == 2
    # Trial 3 is within every threshold above but is not on the front.
    assert choose_trial(frame[frame["trial"] == 3], 0.5) is None


def test_choose_trial_tie_prefers_lower_bpd():
    frame = pd.DataFrame(
        {"trial": [0, 1], "val_bits_per_dim": [3.01, 3.00], "train_nfe_forward": [50.0, 50.0], "pareto": [True, True]}
    )
    assert choose_trial(frame, 0.01) == 1


def test_tune_tolerance_study_resumes(tmp_path, one_thread):
    config = tiny_config()
    tune = TuneConfig(trials=1, log10_min=-4.0, log10_max=-2.0, epochs=1, study_name="tiny")

    first = tune_tolerance(config, tmp_path, tune)
    assert first.trials_run == 1
    assert first.trials_finished == 1
    storage = f"sqlite:///{(tmp_path / 'study.db').resolve()}"
    trial_0 = optuna.load_study(study_name="tiny", storage=storage).trials[0]

    second = tune_tolerance(config, tmp_path, replace(tune, trials=2))
    assert second.trials_run == 1
    assert second.trials_finished == 2
    trials = optuna.load_study(study_name="tiny", storage=storage).trials
    assert [t.number for t in trials] == [0, 1]
    assert trials[0].params == trial_0.params
    assert trials[0].values == trial_0.values
    assert trials[0].datetime_complete == trial_0.datetime_complete

    # Each stored value is the trial's own training result, read back from its metrics.json.
    for trial in trials:
        assert trial.state == optuna.trial.TrialState.COMPLETE
        metrics = pd.read_json(Path(trial.user_attrs["output_dir"]) / "metrics.json", typ="series")
        assert trial.values[0] == pytest.approx(metrics["val_bits_per_dim"], rel=1e-12)
        assert trial.values[1] == pytest.approx(metrics["train_nfe_forward"], rel=1e-12)
        for log10_tol in trial.params.values():
            assert -4.0 <= log10_tol <= -2.0

    third = tune_tolerance(config, tmp_path, replace(tune, trials=2))
    assert third.trials_run == 0
    assert len(optuna.load_study(study_name="tiny", storage=storage).trials) == 2

    table = pd.read_csv(tmp_path / "trials.csv")
    assert list(table["trial"]) == [0, 1]
    assert table["chosen"].sum() == 1
    assert int(table.loc[table["chosen"], "trial"].iloc[0]) == third.chosen_trial
    assert f"Chosen: trial {third.chosen_trial}" in (tmp_path / "trials.md").read_text()
    assert (tmp_path / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tune_tolerance_snippet_loads_into_config(tmp_path, one_thread):
    config = tiny_config()
    tune = TuneConfig(trials=1, log10_min=-4.0, log10_max=-2.0, epochs=1)
    result = tune_tolerance(config, tmp_path, tune)

    snippet = tomllib.loads((tmp_path / "tolerance.toml").read_text())
    assert snippet == {"solver": {"tolerance": {"strategy": "manual", "per_block": list(result.per_block)}}}
    loaded = apply_overrides(config, {"solver.tolerance": snippet["solver"]["tolerance"]})
    assert loaded.solver.tolerance.strategy == "manual"
    assert loaded.solver.tolerance.per_block == result.per_block
    assert len(result.per_block) == config.model.num_blocks
    ManualPolicy(loaded.solver.tolerance.per_block, config.model.num_blocks)

    # best_config.toml is the full config, with its own epochs, and the chosen tolerances.
    best = load_config(tmp_path / "best_config.toml")
    assert best.train.epochs == config.train.epochs
    assert best.solver.tolerance.per_block == result.per_block
    assert best.solver.extra_eval_tolerances == config.solver.extra_eval_tolerances


def test_tune_tolerance_failed_run_is_pruned(tmp_path, one_thread):
    # One solver step is never enough, so every trial ends with step_budget_exceeded.
    config = tiny_config(**{"solver.max_num_steps": 1})
    result = tune_tolerance(config, tmp_path, TuneConfig(trials=2, epochs=1, log10_min=-4.0, log10_max=-2.0))

    assert result.trials_finished == 2
    assert result.chosen_trial is None
    assert not (tmp_path / "tolerance.toml").exists()
    table = pd.read_csv(tmp_path / "trials.csv")
    assert list(table["state"]) == ["PRUNED", "PRUNED"]
    assert list(table["status"]) == ["step_budget_exceeded", "step_budget_exceeded"]
    assert table["reason"].str.contains("max_num_steps = 1").all()
    assert "Chosen: none" in (tmp_path / "trials.md").read_text()


def test_tune_tolerance_rejects_changed_settings(tmp_path, one_thread):
    config = tiny_config(**{"solver.max_num_steps": 1})
    tune = TuneConfig(trials=1, epochs=1, log10_min=-4.0, log10_max=-2.0)
    tune_tolerance(config, tmp_path, tune)
    with pytest.raises(ValueError, match=r"created with other settings \(base_config_hash"):
        tune_tolerance(apply_overrides(config, {"seed": 1}), tmp_path, tune)
    with pytest.raises(ValueError, match=r"created with other settings \(log10_min"):
        tune_tolerance(config, tmp_path, replace(tune, log10_min=-5.0))


def test_tune_tolerance_rejects_fixed_grid_method(tmp_path):
    with pytest.raises(ValueError, match=r"invalid solver.method = 'rk4' for a tolerance search"):
        tune_tolerance(tiny_config(**{"solver.method": "rk4"}), tmp_path, TuneConfig(trials=1))


@pytest.mark.parametrize(
    "flags,match",
    [
        (["--trials", "0"], "invalid --trials 0: expected an integer >= 1"),
        (["--trials", "2", "--epochs", "0"], "invalid --epochs 0: expected an integer >= 1"),
        (["--trials", "2", "--log10-min", "-2", "--log10-max", "-3"], "log10_min = -2.0 is not below log10_max = -3.0"),
        (["--trials", "2", "--threads", "0"], "invalid --threads 0"),
    ],
)
def test_cli_tune_tolerance_rejects_bad_input(tmp_path, capsys, flags, match):
    code = main(["tune-tolerance", "--config", str(DIGITS_CONFIG), "--output", str(tmp_path), *flags])
    assert code == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "study.db").exists()


@pytest.mark.slow
def test_cli_tune_tolerance_writes_outputs(tmp_path):
    args = ["tune-tolerance", "--config", str(DIGITS_CONFIG), "--output", str(tmp_path), "--trials", "3",
            "--epochs", "1", "--threads", "1", "--no-progress", "--set", "model.hidden_dims=[16]"]
    assert main(args) == 0
    for name in ("tolerance.toml", "best_config.toml", "trials.csv", "trials.md", "pareto.png", "study.db"):
        assert (tmp_path / name).is_file(), name
    assert len(pd.read_csv(tmp_path / "trials.csv")) == 3
