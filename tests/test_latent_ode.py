"""Tests of the LatentODE spiral experiment: data, ELBO terms, supervised term, solves, training, CLI."""

import json
import math
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from infocnf.cli import main
from infocnf.latent_ode import (
    CLOCKWISE,
    COUNTER_CLOCKWISE,
    SPIRAL_PRESETS,
    LatentModelConfig,
    LatentODE,
    LatentODEConfig,
    LatentPriorConfig,
    LatentSolverConfig,
    LatentTrainConfig,
    SpiralConfig,
    TrajectorySet,
    apply_latent_ode_overrides,
    evaluate_latent_ode,
    gaussian_kl,
    generate_spirals,
    load_latent_ode,
    load_latent_ode_config,
    load_trajectories,
    make_spiral_splits,
    observation_log_likelihood,
    plot_trajectories,
    predict_trajectories,
    run_latent_ode,
    save_latent_ode_config,
    solve_latent,
    solve_options,
)
from infocnf.config import load_config
from infocnf.solve import SolveError, SolveOptions

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

TINY_DATA = SpiralConfig(num_train=8, num_val=4, num_test=4, grid_points=60, window_points=20, extrapolate_points=10)
TINY_MODEL = LatentModelConfig(latent_dim=4, encoder_hidden=8, ode_hidden_dims=(8,), decoder_hidden_dims=(8,))


@pytest.fixture(autouse=True)
def _one_thread():
    # These small tensors run fastest on one thread, and far slower on two when the CPU is shared.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_config(method: str = "partitioned", **train) -> LatentODEConfig:
    train_config = LatentTrainConfig(**{"epochs": 2, "batch_size": 4, "eval_every": 1, "trajectory_spirals": 2, **train})
    return LatentODEConfig(
        seed=1,
        data=TINY_DATA,
        model=TINY_MODEL,
        prior=LatentPriorConfig(method=method),
        solver=LatentSolverConfig(rtol=1e-3, atol=1e-4, eval_rtol=1e-4, eval_atol=1e-5),
        train=train_config,
    )


# Spirals ---------------------------------------------------------------------------------------


def test_spirals_shapes_and_balanced_labels():
    spirals = generate_spirals(TINY_DATA, 9)
    assert spirals.grid.shape == (60,)
    assert spirals.truth.shape == (9, 60, 2)
    assert spirals.observed.shape == (9, 20, 2)
    assert spirals.window_start.shape == (9,)
    assert int((spirals.labels == CLOCKWISE).sum()) == 4
    assert int((spirals.labels == COUNTER_CLOCKWISE).sum()) == 5
    assert int(spirals.window_start.min()) >= 10
    assert int(spirals.window_start.max()) <= 60 - 20 - 10


def test_spirals_deterministic_per_seed_and_stream():
    first, again = generate_spirals(TINY_DATA, 6), generate_spirals(TINY_DATA, 6)
    assert torch.equal(first.observed, again.observed)
    assert torch.equal(first.window_start, again.window_start)
    other_stream = generate_spirals(TINY_DATA, 6, stream=2)
    assert not torch.equal(first.observed, other_stream.observed)
    other_seed = generate_spirals(SpiralConfig(**{**TINY_DATA.__dict__, "seed": 5}), 6)
    assert not torch.equal(first.observed, other_seed.observed)


def test_spirals_truth_follows_radius_formula():
    spirals = generate_spirals(TINY_DATA, 6)
    radius = spirals.truth.norm(dim=-1)  # (spirals, grid_points)
    expected = spirals.radius[:, None] + spirals.growth[:, None] * spirals.grid[None, :]
    torch.testing.assert_close(radius, expected, atol=1e-5, rtol=1e-5)


def test_spirals_turn_in_labelled_direction():
    spirals = generate_spirals(TINY_DATA, 6)
    x, y = spirals.truth[..., 0], spirals.truth[..., 1]
    # z-component of p_k x p_{k+1} = r_k r_{k+1} sin(theta_{k+1} - theta_k): negative when clockwise.
    cross = x[:, :-1] * y[:, 1:] - x[:, 1:] * y[:, :-1]
    clockwise = spirals.labels == CLOCKWISE
    assert bool((cross[clockwise] < 0).all())
    assert bool((cross[~clockwise] > 0).all())


def test_spirals_noise_matches_noise_std():
    config = SpiralConfig(num_train=2, num_val=2, num_test=2, noise_std=0.3)
    spirals = generate_spirals(config, 200)
    residual = spirals.observed - spirals.segment(0, config.window_points)
    # 200 * 200 * 2 draws: the sample std is within 0.005 of 0.3 with overwhelming probability.
    assert abs(float(residual.std()) - 0.3) < 0.005
    assert abs(float(residual.mean())) < 0.005


def test_spiral_segment_offsets_and_range():
    spirals = generate_spirals(TINY_DATA, 4)
    truth = spirals.truth.numpy()
    start = spirals.window_start.numpy()
    after = spirals.segment(20, 10).numpy()
    before = spirals.segment(-10, 10).numpy()
    for i in range(4):
        np.testing.assert_array_equal(after[i], truth[i, start[i] + 20 : start[i] + 30])
        np.testing.assert_array_equal(before[i], truth[i, start[i] - 10 : start[i]])
    with pytest.raises(ValueError, match="leaves the grid"):
        spirals.segment(-100, 10)


def test_spiral_alternating_indices_mix_directions():
    spirals = generate_spirals(TINY_DATA, 5)  # labels 0, 0, 1, 1, 1
    assert spirals.alternating_indices(4).tolist() == [0, 2, 1, 3]
    assert spirals.alternating_indices(10).tolist() == [0, 2, 1, 3, 4]


def test_spiral_splits_are_separate():
    splits = make_spiral_splits(TINY_DATA)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (8, 4, 4)
    assert not torch.equal(splits.train.observed[:4], splits.test.observed)


def test_spiral_presets_match_config_files():
    assert SPIRAL_PRESETS["paper"].num_train == 5000
    assert load_latent_ode_config(CONFIGS / "latent-ode-quick.toml").data == SPIRAL_PRESETS["quick"]
    assert load_latent_ode_config(CONFIGS / "latent-ode-paper.toml").data == SPIRAL_PRESETS["paper"]


# ELBO terms ------------------------------------------------------------------------------------


def test_gaussian_kl_matches_torch_distributions():
    mean_q, log_std_q = torch.randn(5, 3), 0.3 * torch.randn(5, 3)
    mean_p, log_std_p = torch.randn(5, 3), 0.3 * torch.randn(5, 3)
    q = torch.distributions.Normal(mean_q, log_std_q.exp())
    p = torch.distributions.Normal(mean_p, log_std_p.exp())
    expected = torch.distributions.kl_divergence(q, p).sum(dim=-1)
    torch.testing.assert_close(gaussian_kl(mean_q, log_std_q, mean_p, log_std_p), expected, atol=1e-5, rtol=1e-5)


def test_observation_log_likelihood_by_hand():
    x = torch.tensor([[[1.0, 2.0], [0.0, -1.0]]])  # (1, 2 points, 2)
    mean = torch.tensor([[[0.5, 2.0], [0.0, 0.0]]])
    std = 0.5
    squared = 0.5**2 + 0.0 + 0.0 + 1.0**2
    expected = -0.5 * squared / std**2 - 4 * math.log(std) - 2 * math.log(2 * math.pi)
    assert float(observation_log_likelihood(x, mean, std)) == pytest.approx(expected, abs=1e-5)


def _zero_field(model: LatentODE) -> None:
    # A zero last layer makes dz/dt = 0, so z(t) = z0 at every time.
    last = model.field[-1]
    torch.nn.init.zeros_(last.weight)
    torch.nn.init.zeros_(last.bias)


@pytest.mark.parametrize("method", ["none", "partitioned"])
def test_elbo_terms_by_hand_with_constant_latent(method):
    model = LatentODE(TINY_MODEL, LatentPriorConfig(method=method))
    _zero_field(model)
    if method == "partitioned":
        with torch.no_grad():
            model.prior_encoder.bias.copy_(torch.tensor([0.5, -0.2, 0.1, 0.3]))  # mean (2), log-std (2) of z_y
    spirals = generate_spirals(TINY_DATA, 2)
    times = spirals.relative_times(20)
    options = SolveOptions(atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        out = model(spirals.observed, times, spirals.labels, options, sample=False)
        decoded = model.decoder(out.mean)  # (2, 2): the same point at every time
    for i in range(2):
        squared = float(((spirals.observed[i] - decoded[i]) ** 2).sum())
        expected_ll = -0.5 * squared / 0.3**2 - 40 * (math.log(0.3) + 0.5 * math.log(2 * math.pi))
        assert float(out.log_likelihood[i]) == pytest.approx(expected_ll, rel=1e-5)

        prior_mean = [0.5, -0.2, 0.0, 0.0] if method == "partitioned" else [0.0] * 4
        prior_log_std = [0.1, 0.3, 0.0, 0.0] if method == "partitioned" else [0.0] * 4
        expected_kl = 0.0
        for mq, lq, mp, lp in zip(out.mean[i].tolist(), out.log_std[i].tolist(), prior_mean, prior_log_std):
            expected_kl += lp - lq + (math.exp(2 * lq) + (mq - mp) ** 2) / (2 * math.exp(2 * lp)) - 0.5
        assert float(out.kl[i]) == pytest.approx(expected_kl, rel=1e-5)

    loss, parts = model.loss(out, spirals.labels)
    neg_elbo = float((out.kl - out.log_likelihood).mean())
    assert float(parts["neg_elbo"]) == pytest.approx(neg_elbo, rel=1e-6)
    assert float(parts["neg_elbo_per_value"]) == pytest.approx(neg_elbo / 40, rel=1e-6)


def test_loss_adds_weighted_cross_entropy():
    model = LatentODE(TINY_MODEL, LatentPriorConfig(method="partitioned", ce_weight=0.7))
    spirals = generate_spirals(TINY_DATA, 4)
    out = model(spirals.observed, spirals.relative_times(20), spirals.labels, SolveOptions(atol=1e-4, rtol=1e-3))
    loss, parts = model.loss(out, spirals.labels)
    cross_entropy = F.cross_entropy(out.logits, spirals.labels)
    expected_loss = float(parts["neg_elbo_per_value"]) + 0.7 * float(cross_entropy.detach())
    assert float(loss.detach()) == pytest.approx(expected_loss, rel=1e-6)

    # The classifier's weights reach the loss only through the CE, so their gradient is +0.7 dCE/dW.
    expected = torch.autograd.grad(cross_entropy, model.classifier.weight, retain_graph=True)[0]
    loss.backward()
    torch.testing.assert_close(model.classifier.weight.grad, 0.7 * expected)
    assert float(expected.norm()) > 0


def test_partitioned_training_lowers_cross_entropy():
    torch.manual_seed(3)
    model = LatentODE(TINY_MODEL, LatentPriorConfig(method="partitioned", ce_weight=5.0))
    spirals = generate_spirals(TINY_DATA, 8)
    times = spirals.relative_times(20)
    options = SolveOptions(atol=1e-3, rtol=1e-2)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-2)

    def cross_entropy() -> float:
        with torch.no_grad():
            mean, _ = model.encode(spirals.observed, times)
            return float(F.cross_entropy(model.logits(mean), spirals.labels))

    before = cross_entropy()
    for _ in range(20):
        out = model(spirals.observed, times, spirals.labels, options, sample=False)
        loss, _ = model.loss(out, spirals.labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = cross_entropy()
    assert after < before - 0.1


def test_baseline_prior_is_standard_normal():
    model = LatentODE(TINY_MODEL, LatentPriorConfig(method="none"))
    assert model.supervised_dim == 0
    assert model.logits(torch.zeros(3, 4)) is None
    mean, log_std = model.prior_params(torch.tensor([0, 1, 1]))
    assert torch.equal(mean, torch.zeros(3, 4))
    assert torch.equal(log_std, torch.zeros(3, 4))


def test_encoder_reads_window_backwards():
    model = LatentODE(TINY_MODEL, LatentPriorConfig(method="none"))
    spirals = generate_spirals(TINY_DATA, 2)
    times = spirals.relative_times(20)
    # Step k of the GRU reads point 19 - k and the time elapsed since point 20 - k (0 at step 0).
    gaps = torch.zeros(20)
    for k in range(1, 20):
        gaps[k] = times[20 - k] - times[19 - k]
    inputs = torch.cat([spirals.observed.flip(1), gaps[None, :, None].expand(2, -1, 1)], dim=-1)
    _, hidden = model.encoder(inputs)
    expected_mean, _ = model.encoder_head(hidden[0]).chunk(2, dim=-1)
    mean, _ = model.encode(spirals.observed, times)
    torch.testing.assert_close(mean, expected_mean)


# Latent solves ---------------------------------------------------------------------------------


def test_solve_latent_rotation_matches_closed_form():
    field = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        field.weight.copy_(torch.tensor([[0.0, -1.0], [1.0, 0.0]]))  # dz/dt = A z, a rotation at 1 rad per unit
    z0 = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    field = field.double()
    options = SolveOptions(atol=1e-10, rtol=1e-10)
    for sign in (1.0, -1.0):
        times = sign * torch.linspace(0, 3, 7, dtype=torch.float64)
        path, stats = solve_latent(field, z0, times, options)  # (7, 2, 2)
        angle = times[:, None]
        expected = torch.stack(
            [z0[:, 0] * torch.cos(angle) - z0[:, 1] * torch.sin(angle), z0[:, 0] * torch.sin(angle) + z0[:, 1] * torch.cos(angle)],
            dim=-1,
        )
        torch.testing.assert_close(path, expected, atol=1e-8, rtol=0)
        assert stats.nfe_forward > 0
        assert (stats.atol, stats.rtol) == (1e-10, 1e-10)


def test_solve_latent_counts_backward_evaluations():
    model = LatentODE(TINY_MODEL, LatentPriorConfig(method="none"))
    z0 = torch.randn(3, 4, requires_grad=True)
    path, stats = solve_latent(model.field, z0, torch.linspace(0, 2, 5), SolveOptions(atol=1e-5, rtol=1e-5))
    assert stats.nfe_backward == 0
    path.sum().backward()
    assert 0 < stats.nfe_backward <= stats.nfe_forward


def test_solve_latent_step_budget_is_typed_error():
    model = LatentODE(TINY_MODEL, LatentPriorConfig(method="none"))
    options = SolveOptions(atol=1e-9, rtol=1e-9, max_num_steps=2)
    with pytest.raises(SolveError) as info:
        solve_latent(model.field, torch.randn(3, 4), torch.linspace(0, 50, 5), options)
    assert info.value.status == "step_budget_exceeded"
    assert "max_num_steps" in info.value.message


# Configs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, match",
    [
        ("prior.method=ccnf", r"invalid prior.method = 'ccnf': expected none or partitioned"),
        ("data.window_points=900", r"invalid data.grid_points = 1000: expected at least"),
        ("data.num_train=1", r"invalid data.num_train = 1"),
        ("data.noise_std=-0.1", r"invalid data.noise_std = -0.1"),
        ("data.radius_max=0.1", r"invalid data.radius_max = 0.1"),
        ("solver.rtol=0", r"invalid solver.rtol = 0.0: expected a tolerance in \(0, 1\)"),
        ("solver.method=euler", r"invalid solver.method = 'euler': expected an adaptive torchdiffeq method"),
        ("model.latent_dim=1", r"invalid model.latent_dim = 1"),
        ("model.ode_hidden_dims=[]", r"invalid model.ode_hidden_dims = \[\]"),
        ("prior.supervised_ratio=1.0", r"invalid prior.supervised_ratio = 1.0"),
        ("train.lr=-1", r"invalid train.lr = -1.0"),
        ("train.lr_decay_epochs=[5, 3]", r"invalid train.lr_decay_epochs = \[5, 3\]"),
        ("train.trajectory_spirals=500", r"invalid train.trajectory_spirals = 500: expected at most data.num_test = 200"),
        ("train.epochs=true", r"invalid train.epochs = True"),
        ("train.device=tpu", r"invalid train.device = 'tpu'"),
        ("train.speed=3", r"unknown setting 'train.speed'"),
        ("optimizer.lr=3", r"unknown setting 'optimizer.lr': 'optimizer' is not a section"),
        ("train.epochs", r"invalid override 'train.epochs': expected section.key=value"),
    ],
)
def test_config_rejects_bad_values(override, match):
    with pytest.raises(ValueError, match=match):
        apply_latent_ode_overrides(LatentODEConfig(), [override])


def test_config_file_errors(tmp_path):
    with pytest.raises(ValueError, match="config file not found"):
        load_latent_ode_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nepochs = 3")
    with pytest.raises(ValueError, match="invalid TOML"):
        load_latent_ode_config(bad)
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("[train]\nepoch = 3\n")
    with pytest.raises(ValueError, match=r"unknown setting train.epoch: the \[train\] table accepts"):
        load_latent_ode_config(unknown)


def test_config_files_swapped_name_command():
    with pytest.raises(ValueError, match="is for infocnf train"):
        load_latent_ode_config(CONFIGS / "digits-ccnf.toml")
    with pytest.raises(ValueError, match="is for infocnf latent-ode"):
        load_config(CONFIGS / "latent-ode-quick.toml")


def test_config_round_trip(tmp_path):
    config = apply_latent_ode_overrides(LatentODEConfig(), {"prior.method": "none", "model.ode_hidden_dims": [16, 8]})
    save_latent_ode_config(config, tmp_path / "config.toml")
    loaded = load_latent_ode_config(tmp_path / "config.toml")
    assert loaded == config
    assert loaded.hash() == config.hash()
    assert loaded.flat()["model.ode_hidden_dims"] == [16, 8]
    assert tomllib.loads((tmp_path / "config.toml").read_text())["solver"]["rtol"] == 1e-4


# Training, metrics, figure and CLI ---------------------------------------------------------------


class _Recorder:
    def __init__(self):
        self.events = []

    def on_start(self, trainer):
        self.events.append("start")

    def on_iteration(self, trainer, iteration, per_epoch):
        self.events.append(f"iteration {iteration}/{per_epoch}")

    def on_epoch_end(self, trainer, row):
        self.events.append(f"epoch {row['epoch']}")

    def on_end(self, trainer, result):
        self.events.append(f"end {result.status}")


@pytest.mark.parametrize("method", ["none", "partitioned"])
def test_run_latent_ode_writes_results(tmp_path, method):
    recorder = _Recorder()
    result = run_latent_ode(tiny_config(method), tmp_path, [recorder])
    assert result.status == "finished", result.reason
    assert recorder.events == [
        "start", "iteration 1/2", "iteration 2/2", "epoch 1", "iteration 1/2", "iteration 2/2", "epoch 2", "end finished"
    ]
    for name in ("config.toml", "history.csv", "metrics.json", "model.pt", "trajectories.npz"):
        assert (tmp_path / name).is_file(), name
    assert all(isinstance(value, float) for value in result.metrics.values())
    assert len(result.history) == 2
    for key in ("test_mse_window", "test_mse_forward", "test_mse_backward", "test_probe_error", "rtol", "eval_atol"):
        assert math.isfinite(result.metrics[key]), key
    assert math.isnan(result.metrics["test_error"]) == (method == "none")
    record = json.loads((tmp_path / "metrics.json").read_text())
    assert record["status"] == "finished"
    assert record["test_mse_forward"] == pytest.approx(result.metrics["test_mse_forward"])
    # Strict JSON: a metric that does not apply is null, not NaN.
    assert "NaN" not in (tmp_path / "metrics.json").read_text()
    assert (record["test_error"] is None) == (method == "none")


def test_run_latent_ode_is_seeded(tmp_path):
    first = run_latent_ode(tiny_config(trajectory_spirals=0), tmp_path / "a")
    second = run_latent_ode(tiny_config(trajectory_spirals=0), tmp_path / "b")
    assert first.metrics["test_mse_window"] == second.metrics["test_mse_window"]
    assert first.history[-1]["train_loss"] == second.history[-1]["train_loss"]


class _Interrupt(Exception):
    """Stands for a run killed after its first epoch."""


class _InterruptAfterFirstEpoch:
    def on_epoch_end(self, trainer, row):
        raise _Interrupt


def _without_wall_time(rows):
    # NaN (a metric that does not apply) becomes None, so that equal rows compare equal.
    return [
        {key: None if isinstance(value, float) and math.isnan(value) else value
         for key, value in row.items() if key != "elapsed_s"}
        for row in rows
    ]


@pytest.mark.parametrize("method", ["none", "partitioned"])
def test_latent_ode_resume_exact(tmp_path, method):
    config = tiny_config(method, trajectory_spirals=0)
    straight = run_latent_ode(config, tmp_path / "straight")

    # The interrupted run has written checkpoints/last.pt after epoch 1; a new run resumes from it.
    with pytest.raises(_Interrupt):
        run_latent_ode(config, tmp_path / "resumed", [_InterruptAfterFirstEpoch()])
    assert (tmp_path / "resumed" / "checkpoints" / "last.pt").is_file()
    recorder = _Recorder()
    resumed = run_latent_ode(config, tmp_path / "resumed", [recorder])

    assert recorder.events == ["start", "iteration 1/2", "iteration 2/2", "epoch 2", "end finished"]
    assert straight.status == resumed.status == "finished"
    assert _without_wall_time(resumed.history) == _without_wall_time(straight.history)
    for key, value in straight.metrics.items():
        if key != "elapsed_s":
            assert resumed.metrics[key] == value or (math.isnan(value) and math.isnan(resumed.metrics[key])), key


class _OutOfMemoryOnSecondIteration:
    def on_iteration(self, trainer, iteration, iterations_per_epoch):
        if trainer.iteration == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (raised by the test)")


def test_latent_ode_out_of_memory_recorded(tmp_path):
    result = run_latent_ode(tiny_config(trajectory_spirals=0), tmp_path, [_OutOfMemoryOnSecondIteration()])
    assert result.status == "out_of_memory"
    assert "lower train.batch_size" in result.reason
    record = json.loads((tmp_path / "metrics.json").read_text())
    assert record["status"] == "out_of_memory"
    assert record["epochs_completed"] == 0.0


def test_latent_ode_no_resume_starts_over(tmp_path):
    config = tiny_config(trajectory_spirals=0)
    with pytest.raises(_Interrupt):
        run_latent_ode(config, tmp_path, [_InterruptAfterFirstEpoch()])
    recorder = _Recorder()
    result = run_latent_ode(config, tmp_path, [recorder], resume=False)
    assert result.status == "finished"
    assert recorder.events.count("iteration 1/2") == 2
    assert [row["epoch"] for row in result.history] == [1, 2]


def test_latent_ode_resume_rejects_other_config(tmp_path):
    run_latent_ode(tiny_config(epochs=1, trajectory_spirals=0), tmp_path)
    with pytest.raises(ValueError, match="belongs to a different config") as caught:
        run_latent_ode(tiny_config(epochs=2, trajectory_spirals=0), tmp_path)
    assert "--no-resume" in str(caught.value)
    assert "changed settings: train.epochs: 1 -> 2" in str(caught.value)
    # The rejected config leaves the folder's config.toml as the checkpoint's.
    assert load_latent_ode_config(tmp_path / "config.toml").train.epochs == 1


def test_latent_ode_no_resume_deletes_old_results(tmp_path):
    run_latent_ode(tiny_config(epochs=1), tmp_path)
    for name in ("metrics.json", "model.pt", "trajectories.npz"):
        assert (tmp_path / name).is_file(), name
    with pytest.raises(_Interrupt):
        run_latent_ode(tiny_config(epochs=2), tmp_path, [_InterruptAfterFirstEpoch()], resume=False)
    for name in ("metrics.json", "model.pt", "trajectories.npz"):
        assert not (tmp_path / name).exists(), name
    assert load_latent_ode_config(tmp_path / "config.toml").train.epochs == 2
    assert (tmp_path / "checkpoints" / "last.pt").is_file()


def test_latent_ode_output_is_file_rejected(tmp_path):
    output = tmp_path / "taken"
    output.write_text("not a folder")
    with pytest.raises(ValueError, match="is an existing file"):
        run_latent_ode(tiny_config(epochs=1), output)
    assert output.read_text() == "not a folder"


def test_evaluation_errors_match_trajectories(tmp_path):
    config = tiny_config()
    run_latent_ode(config, tmp_path)
    model, loaded = load_latent_ode(tmp_path)
    assert loaded == config
    test = make_spiral_splits(config.data).test
    options = solve_options(config.solver, evaluation=True)
    metrics = evaluate_latent_ode(model, test, config.solver, batch_size=3, extrapolate_points=10, seed=0)
    trajectories = predict_trajectories(model, test, options, extrapolate_points=10)

    # Independent indexing of the noise-free grid with NumPy, per spiral.
    forward, backward, window = [], [], []
    for i, start in enumerate(trajectories.window_start):
        truth = trajectories.truth[i]
        window.append(np.mean((trajectories.fit[i] - truth[start : start + 20]) ** 2))
        forward.append(np.mean((trajectories.forward[i] - truth[start + 20 : start + 30]) ** 2))
        backward.append(np.mean((trajectories.backward[i] - truth[start - 10 : start][::-1]) ** 2))
    # Batches of 3 and 1 take other adaptive steps than one batch of 4, so the two agree to about
    # the evaluation tolerance (rtol 1e-4), not exactly.
    assert metrics["mse_window"] == pytest.approx(np.mean(window), rel=2e-3)
    assert metrics["mse_forward"] == pytest.approx(np.mean(forward), rel=2e-3)
    assert metrics["mse_backward"] == pytest.approx(np.mean(backward), rel=2e-3)


def test_plot_trajectories_side_by_side(tmp_path):
    spirals = generate_spirals(TINY_DATA, 3)
    rng = np.random.default_rng(0)

    def fake_predictions() -> TrajectorySet:
        return TrajectorySet(
            truth=spirals.truth.numpy(),
            observed=spirals.observed.numpy(),
            fit=rng.normal(size=(3, 20, 2)),
            forward=rng.normal(size=(3, 10, 2)),
            backward=rng.normal(size=(3, 10, 2)),
            window_start=spirals.window_start.numpy(),
            labels=spirals.labels.numpy(),
        )

    baseline = fake_predictions()
    path = plot_trajectories({"N(0, I)": baseline, "partitioned": fake_predictions()}, tmp_path / "fig.png", num_spirals=2)
    assert path.stat().st_size > 1000
    other = fake_predictions()
    other.window_start = other.window_start + 1
    with pytest.raises(ValueError, match="cover different spirals"):
        plot_trajectories({"a": baseline, "b": other}, tmp_path / "bad.png")
    with pytest.raises(ValueError, match="trajectory file not found"):
        load_trajectories(tmp_path)


def test_cli_latent_ode_runs_and_rejects_bad_input(tmp_path, capsys):
    config = tiny_config(epochs=1)
    save_latent_ode_config(config, tmp_path / "tiny.toml")
    out = tmp_path / "run"
    code = main(["latent-ode", "--config", str(tmp_path / "tiny.toml"), "--output", str(out), "--seed", "4", "--no-progress"])
    assert code == 0
    assert load_latent_ode_config(out / "config.toml").seed == 4
    assert (out / "trajectories.png").is_file()

    code = main(["latent-ode", "--config", str(tmp_path / "tiny.toml"), "--output", str(out), "--set", "solver.atol=2"])
    assert code == 2
    assert "infocnf latent-ode: error: invalid solver.atol = 2.0" in capsys.readouterr().err


@pytest.mark.slow
def test_quick_preset_fits_and_classifies(tmp_path):
    config = load_latent_ode_config(CONFIGS / "latent-ode-quick.toml")
    result = run_latent_ode(config, tmp_path)
    assert result.status == "finished", result.reason
    # Seed 0 of the quick preset reached a window MSE of about 0.07 and no direction errors.
    assert result.metrics["test_mse_window"] < 0.2
    assert result.metrics["test_error"] < 0.1
