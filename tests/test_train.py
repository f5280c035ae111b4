"""Tests of the training loop: outputs, exact resume, divergence handling and the lr schedule."""

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from infocnf.config import (
    ConditioningConfig,
    DataConfig,
    ModelConfig,
    RunConfig,
    SolverConfig,
    ToleranceConfig,
    TrainConfig,
    load_config,
    save_config,
)
from infocnf.cli import main
from infocnf.train import Trainer, learning_rate_at, train_run

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def tiny_config(epochs: int = 2, strategy: str = "fixed", **train) -> RunConfig:
    return RunConfig(
        seed=1,
        data=DataConfig(name="digits", max_examples=256),
        model=ModelConfig(hidden_dims=(16,), num_blocks=1),
        conditioning=ConditioningConfig(method="infocnf"),
        solver=SolverConfig(
            eval_tolerance=1e-3,
            extra_eval_tolerances=(1e-4,),
            tolerance=ToleranceConfig(strategy=strategy, value=1e-3, log10_min=-4.0, log10_max=-2.0, log10_init=-3.0),
        ),
        train=TrainConfig(epochs=epochs, batch_size=64, eval_batch_size=256, device="cpu", **train),
    )


class EventLog:
    """Callback that records the events it receives."""

    def __init__(self):
        self.events = []

    def on_start(self, trainer):
        self.events.append("start")

    def on_iteration(self, trainer, iteration, iterations_per_epoch):
        self.events.append("iteration")

    def on_epoch_end(self, trainer, row):
        self.events.append(f"epoch {row['epoch']}")

    def on_end(self, trainer, result):
        self.events.append(f"end {result.status}")


def test_train_writes_outputs(tmp_path):
    config = tiny_config(epochs=2)
    events = EventLog()
    result = train_run(config, tmp_path, callbacks=[events])

    assert result.status == "finished"
    assert load_config(tmp_path / "config.toml") == config
    # 256 training images in batches of 64: 4 iterations per epoch.
    assert events.events == ["start"] + ["iteration"] * 4 + ["epoch 1"] + ["iteration"] * 4 + ["epoch 2", "end finished"]

    history = pd.read_csv(tmp_path / "history.csv")
    assert history["epoch"].tolist() == [1, 2]
    assert (history["train_nfe_forward"] > 0).all()
    assert (history["train_nfe_backward"] > 0).all()

    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["status"] == "finished"
    assert metrics["epochs_completed"] == 2
    assert metrics["eval_tolerance"] == 1e-3
    assert metrics["extra_eval_tolerances"] == [1e-4]
    for key in ("test_bits_per_dim", "test_error", "val_bits_per_dim", "test_bits_per_dim_at_0.0001",
                "baseline_diag_gaussian_test_bits_per_dim", "train_nfe_forward", "train_nfe_backward"):
        assert key in metrics, key
    assert 0.0 <= metrics["test_error"] <= 1.0
    assert (tmp_path / "checkpoints" / "last.pt").is_file()
    assert (tmp_path / "checkpoints" / "best.pt").is_file()


class Interrupt(Exception):
    """Stands for a run killed after its first epoch."""


class InterruptAfterFirstEpoch:
    def on_epoch_end(self, trainer, row):
        raise Interrupt


def without_wall_time(rows):
    return [{k: v for k, v in row.items() if k != "elapsed_s"} for row in rows]


@pytest.mark.parametrize("strategy", ["fixed", "learned"])
def test_train_resume_exact(tmp_path, strategy):
    config = tiny_config(epochs=2, strategy=strategy)
    straight = Trainer(config, tmp_path / "straight").fit()

    # The interrupted run has saved checkpoints/last.pt after epoch 1; a new Trainer resumes it.
    with pytest.raises(Interrupt):
        Trainer(config, tmp_path / "resumed", callbacks=[InterruptAfterFirstEpoch()]).fit()
    resumed_trainer = Trainer(config, tmp_path / "resumed")
    resumed = resumed_trainer.fit()

    assert resumed_trainer.epoch == 2
    assert straight.status == resumed.status == "finished"
    assert without_wall_time(resumed.history) == without_wall_time(straight.history)
    for key, value in straight.metrics.items():
        if key != "elapsed_s":
            assert resumed.metrics[key] == value, key


def test_train_resume_rejects_other_config(tmp_path):
    Trainer(tiny_config(epochs=1), tmp_path).fit()
    with pytest.raises(ValueError, match="belongs to a different config") as caught:
        Trainer(tiny_config(epochs=1, lr=2e-3), tmp_path).fit()
    assert "changed settings: train.lr: 0.001 -> 0.002" in str(caught.value)
    # The rejected config leaves the folder's config.toml as the checkpoint's.
    assert load_config(tmp_path / "config.toml").train.lr == 1e-3


def test_train_no_resume_deletes_old_results(tmp_path):
    Trainer(tiny_config(epochs=1), tmp_path).fit()
    assert (tmp_path / "metrics.json").is_file()
    with pytest.raises(Interrupt):
        Trainer(tiny_config(epochs=2, lr=2e-3), tmp_path, callbacks=[InterruptAfterFirstEpoch()]).fit(resume=False)
    # The interrupted new run has its own config, history and checkpoint, and no old metrics.
    assert not (tmp_path / "metrics.json").exists()
    assert load_config(tmp_path / "config.toml").train.lr == 2e-3
    assert len(pd.read_csv(tmp_path / "history.csv")) == 1
    assert (tmp_path / "checkpoints" / "last.pt").is_file()


def test_train_output_is_file_rejected(tmp_path):
    output = tmp_path / "taken"
    output.write_text("not a folder")
    with pytest.raises(ValueError, match="is an existing file"):
        Trainer(tiny_config(epochs=1), output).fit()
    assert output.read_text() == "not a folder"


def test_cli_train_other_config_suggests_no_resume(tmp_path, capsys):
    save_config(tiny_config(epochs=1), tmp_path / "tiny.toml")
    args = ["train", "--config", str(tmp_path / "tiny.toml"), "--output", str(tmp_path / "run"), "--no-progress"]
    assert main(args) == 0
    assert main([*args, "--lr", "2e-3"]) == 2
    err = capsys.readouterr().err
    assert "belongs to a different config" in err
    assert "Use a new output folder (--output DIR), restore the original settings" in err
    assert "pass --no-resume to delete this folder's checkpoints and results and start over" in err
    assert main([*args, "--lr", "2e-3", "--no-resume"]) == 0
    assert load_config(tmp_path / "run" / "config.toml").train.lr == 2e-3


def test_train_diverged_run_reports_status(tmp_path):
    config = tiny_config(epochs=2, divergence_threshold=1e-3)
    result = Trainer(config, tmp_path).fit()
    assert result.status == "diverged"
    assert "training loss" in result.reason
    assert "lower train.lr" in result.reason
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["status"] == "diverged"
    assert metrics["epochs_completed"] == 0


def test_learning_rate_at_warmup_and_decay():
    config = RunConfig(train=TrainConfig(lr=1e-3, warmup_iters=4, lr_decay_epochs=(2, 5), lr_decay_factor=0.1))
    # Linear warm-up over iterations 0..3 (global count), then 1e-3 until epoch 2, 1e-4, then 1e-5.
    cases = [
        ((0, 0), 0.25e-3),
        ((0, 1), 0.5e-3),
        ((0, 3), 1e-3),
        ((1, 10), 1e-3),
        ((2, 20), 1e-4),
        ((4, 40), 1e-4),
        ((5, 50), 1e-5),
    ]
    for (epoch, iteration), expected in cases:
        assert learning_rate_at(config, epoch, iteration) == pytest.approx(expected, rel=1e-12), (epoch, iteration)


def test_learning_rate_at_cifar10_preset():
    config = load_config(CONFIGS / "cifar10-infocnf.toml")
    # Epochs count from 0: the 250th epoch (249) still trains at 1e-3, the 251st at 1e-4.
    assert learning_rate_at(config, 0, 0) == pytest.approx(1e-3)
    assert learning_rate_at(config, 249, 0) == pytest.approx(1e-3)
    assert learning_rate_at(config, 250, 0) == pytest.approx(1e-4)
    assert learning_rate_at(config, 399, 0) == pytest.approx(1e-4)


class OutOfMemoryOnSecondIteration:
    def on_iteration(self, trainer, iteration, iterations_per_epoch):
        if trainer.iteration == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (raised by the test)")


def test_train_out_of_memory_recorded(tmp_path):
    result = Trainer(tiny_config(epochs=1), tmp_path, callbacks=[OutOfMemoryOnSecondIteration()]).fit()
    assert result.status == "out_of_memory"
    assert "set solver.adjoint = true" in result.reason
    record = json.loads((tmp_path / "metrics.json").read_text())
    assert record["status"] == "out_of_memory"
