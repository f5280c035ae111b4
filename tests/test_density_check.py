"""Tests of the density validity check: known densities, quadrature agreement, verdict, configs and CLI."""

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from infocnf.cli import main
from infocnf.config import ConditioningConfig, ModelConfig
from infocnf.density_check import (
    DensityCheckConfig,
    DensityModel,
    SweepConfig,
    apply_density_check_overrides,
    choose_verdict_tolerance,
    grid_points,
    load_density_check_config,
    load_or_train_density_model,
    mixture_log_prob,
    riemann_log_integral,
    sample_mixture,
    sweep_tolerances,
    validate_tolerances,
    write_sweep_outputs,
)
from infocnf.solve import SolveOptions

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
_LOG_2PI = math.log(2 * math.pi)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # These networks are tiny: a second intra-op thread buys nothing, and when other processes share
    # the cores it slows every solve several times over.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class LinearField(nn.Module):
    """f(t, z) = z A^T: the flow is z(t) = exp(t A) x and delta_log_prob = -t tr(A), in closed form."""

    def __init__(self, matrix: torch.Tensor):
        super().__init__()
        self.matrix = nn.Parameter(matrix.clone())

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return z @ self.matrix.T


def _model(dim: int, method: str = "none", num_classes: int = 3) -> DensityModel:
    return DensityModel(dim, num_classes, ModelConfig(hidden_dims=(16, 16), num_blocks=1, activation="tanh"),
                        ConditioningConfig(method=method))


def _zero_field_model(dim: int, method: str = "none") -> DensityModel:
    # The field's last layer at zero makes f = 0, so z = x and the density is the prior itself.
    model = _model(dim, method)
    last = model.flow.blocks[0].field.layers[-1].linear
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    return model


def _linear_field_model(matrix: torch.Tensor, method: str = "none") -> DensityModel:
    model = _model(matrix.shape[0], method)
    model.flow.blocks[0].field = LinearField(matrix)
    return model


def _set_class_prior(model: DensityModel, means: list[float], stds: list[float]) -> None:
    # The ccnf prior encoder maps a one-hot label to (mean, log-std); its weight columns are per class.
    with torch.no_grad():
        model.head.prior_encoder.weight.copy_(torch.tensor([means, [math.log(s) for s in stds]]))
        model.head.prior_encoder.bias.zero_()


def _sweep(tolerances, quad_tolerances=(), low=-15.0, high=15.0, points=1500) -> SweepConfig:
    return SweepConfig(tolerances=tuple(tolerances), quad_tolerances=tuple(quad_tolerances), low=low, high=high,
                       points=points)


# Known densities -------------------------------------------------------------------------------


def test_zero_field_integrates_to_one_1d():
    table = sweep_tolerances(_zero_field_model(1), _sweep([1e-3, 1e-6], quad_tolerances=[1e-6]), [0.0])
    assert list(table["tolerance"]) == [1e-3, 1e-6]
    assert (table["status"] == "ok").all()
    # N(0, 1) outside [-15, 15] has mass 2 Phi(-15) ~ 7e-51, and the grid sum's error for a Gaussian
    # falls faster than any power of the cell width, so only float64 round-off remains.
    assert (table["abs_error"] < 1e-6).all()
    assert table["abs_error"].max() < 1e-12
    assert table.loc[1, "quad_gap"] < 1e-6


def test_linear_field_density_matches_closed_form_1d():
    a = 0.7
    model = _linear_field_model(torch.tensor([[a]], dtype=torch.float64))
    options = SolveOptions(atol=1e-10, rtol=1e-10, divergence="exact")
    x = torch.linspace(-4, 4, 9, dtype=torch.float64)[:, None]  # (9, 1)
    with torch.no_grad():
        log_p = model.double().log_prob(x, None, options)
    # x maps to z = exp(a) x, so p(x) = N(exp(a) x; 0, 1) * exp(a).
    z = math.exp(a) * x[:, 0]
    expected = -0.5 * (z**2 + _LOG_2PI) + a
    torch.testing.assert_close(log_p, expected, atol=1e-8, rtol=0)


def test_linear_field_integrates_to_one_1d():
    table = sweep_tolerances(_linear_field_model(torch.tensor([[-0.6]])), _sweep([1e-2, 1e-5, 1e-8]))
    # The density is N(0, exp(1.2)), std 1.8, so [-15, 15] contains all but ~1e-16 of the mass and
    # what remains is solver error, which falls with the tolerance.
    errors = list(table["abs_error"])
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-6


def test_linear_field_integrates_to_one_2d():
    matrix = torch.tensor([[0.3, 0.5], [-0.2, -0.4]])
    table = sweep_tolerances(_linear_field_model(matrix), _sweep([1e-4, 1e-8], low=-10.0, high=10.0, points=200))
    assert len(table) == 2
    assert table["integral_quad"].isna().all()
    assert table["abs_error"].iloc[1] < table["abs_error"].iloc[0]
    assert table["abs_error"].iloc[1] < 1e-6
    assert (table["halved_grid_gap"] < 1e-6).all()


def test_linear_field_density_matches_closed_form_2d():
    matrix = torch.tensor([[0.3, 0.5], [-0.2, -0.4]], dtype=torch.float64)
    model = _linear_field_model(matrix).double()
    grid, _ = grid_points(_sweep([1e-3], low=-3.0, high=3.0, points=7), dim=2)
    options = SolveOptions(atol=1e-10, rtol=1e-10, divergence="exact")
    with torch.no_grad():
        log_p = model.log_prob(grid, None, options)
    # z = expm(A) x and log|det expm(A)| = tr(A).
    z = grid @ torch.linalg.matrix_exp(matrix).T
    expected = -0.5 * (z.pow(2).sum(dim=1) + 2 * _LOG_2PI) + torch.trace(matrix)
    torch.testing.assert_close(log_p, expected, atol=1e-8, rtol=0)


def test_conditional_densities_integrate_to_one():
    model = _linear_field_model(torch.tensor([[0.4]]), method="ccnf")
    _set_class_prior(model, means=[-3.0, 0.0, 2.5], stds=[0.5, 1.0, 1.5])
    table = sweep_tolerances(model, _sweep([1e-3, 1e-7], quad_tolerances=[1e-7]), [-2.0, 0.0, 2.0])
    assert list(table["label"]) == [0, 1, 2, 0, 1, 2]
    # One grid solve per tolerance serves every label.
    assert table.groupby("tolerance")["nfe"].nunique().eq(1).all()
    tight = table[table["tolerance"] == 1e-7]
    assert (tight["abs_error"] < 1e-6).all()
    assert (tight["quad_gap"] < 1e-6).all()


def test_zero_field_conditional_2d_integrates_to_one():
    model = _zero_field_model(2, method="infocnf")
    with torch.no_grad():
        model.head.prior_encoder.weight.copy_(torch.tensor([[-2.0, 1.0, 3.0], [-0.5, 0.0, 0.3]]))
    table = sweep_tolerances(model, _sweep([1e-5], low=-12.0, high=12.0, points=240))
    assert list(table["label"]) == [0, 1, 2]
    assert (table["abs_error"] < 1e-6).all()


# Riemann sum and quad --------------------------------------------------------------------------


def test_riemann_log_integral_survives_underflow():
    grid, log_cell_volume = grid_points(_sweep([1e-3], points=3000), dim=1)
    log_p = -0.5 * (grid[:, 0] ** 2 + _LOG_2PI)
    assert abs(riemann_log_integral(log_p, log_cell_volume)) < 1e-12
    # Shifted by -2000, every exp(log p) underflows to 0 in float64, but the log-space sum does not.
    assert torch.exp(log_p - 2000).max() == 0
    assert riemann_log_integral(log_p - 2000, log_cell_volume) == pytest.approx(-2000, abs=1e-9)


def test_riemann_and_quad_agree_on_untrained_flow():
    # A random tanh field gives a density with no closed form; the grid sum and quad must still agree.
    torch.manual_seed(3)
    model = _model(1)
    table = sweep_tolerances(model, _sweep([1e-8], quad_tolerances=[1e-8], points=3000))
    row = table.iloc[0]
    assert row["status"] == "ok"
    assert row["quad_evaluations"] > 0
    assert row["quad_gap"] < 1e-6
    assert row["halved_grid_gap"] < 1e-9
    assert row["abs_error"] < 1e-6


def test_sweep_error_falls_as_tolerance_tightens():
    torch.manual_seed(3)
    model = _model(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(3.0)  # A stiffer field, so that loose tolerances visibly miss.
    table = sweep_tolerances(model, _sweep([1e-1, 1e-8], points=1500))
    loose, tight = table["abs_error"]
    assert tight < loose
    assert tight < 1e-6
    assert table["nfe"].iloc[1] > table["nfe"].iloc[0]


def test_sweep_records_failed_solve():
    torch.manual_seed(3)
    model = _model(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(3.0)
    # This field needs 2 steps at 1e-2 and about 12 at 1e-8, so a budget of 5 fails only the tight solve.
    sweep = SweepConfig(tolerances=(1e-2, 1e-8), quad_tolerances=(), points=300, max_num_steps=5)
    table = sweep_tolerances(model, sweep)
    assert list(table["status"]) == ["ok", "step_budget_exceeded"]
    assert math.isnan(table["integral"].iloc[1])
    assert "max_num_steps" in table["message"].iloc[1]
    assert choose_verdict_tolerance(table, 1e-3) is None


# Verdict ---------------------------------------------------------------------------------------


def _table(errors: list[float], labels: list[int | None] | None = None, status: list[str] | None = None,
           tolerances: list[float] | None = None) -> pd.DataFrame:
    tolerances = tolerances or [10.0 ** -(i + 1) for i in range(len(errors))]
    return pd.DataFrame({
        "tolerance": tolerances,
        "label": pd.array(labels or [None] * len(errors), dtype="Int64"),
        "abs_error": errors,
        "status": status or ["ok"] * len(errors),
    })


def test_verdict_picks_loosest_passing_tolerance():
    table = _table([3e-2, 6e-3, 5e-3, 8e-5, 1e-6, 1e-7])
    assert choose_verdict_tolerance(table, 1e-3) == 1e-4
    assert choose_verdict_tolerance(table, 1e-1) == 1e-1
    assert choose_verdict_tolerance(table, 1e-5) == 1e-5


def test_verdict_skips_lucky_loose_tolerance():
    # 1e-2 passes by cancellation but 1e-3 fails, so the verdict is 1e-4, the loosest that passes with every tighter one.
    table = _table([3e-2, 2e-4, 5e-3, 8e-5, 1e-6])
    assert choose_verdict_tolerance(table, 1e-3) == 1e-4


def test_verdict_needs_every_label():
    tolerances = [1e-3, 1e-3, 1e-4, 1e-4, 1e-5, 1e-5]
    table = _table([5e-4, 2e-3, 1e-4, 5e-3, 1e-6, 1e-6], labels=[0, 1, 0, 1, 0, 1], tolerances=tolerances)
    assert choose_verdict_tolerance(table, 1e-3) == 1e-5


def test_verdict_rejects_failed_solves():
    table = _table([1e-4, math.nan, 1e-7], status=["ok", "step_budget_exceeded", "ok"])
    assert choose_verdict_tolerance(table, 1e-3) == 1e-3


def test_verdict_none_when_tightest_fails():
    assert choose_verdict_tolerance(_table([1e-4, 1e-5, 2e-3]), 1e-3) is None


def test_verdict_rejects_bad_threshold():
    with pytest.raises(ValueError, match=r"invalid threshold = -0\.1"):
        choose_verdict_tolerance(_table([1e-4]), -0.1)
    with pytest.raises(ValueError, match="lacks the column 'abs_error'"):
        choose_verdict_tolerance(pd.DataFrame({"tolerance": [1e-3]}), 1e-3)


# Tolerance lists and configs -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tolerances", "match"),
    [
        ([], r"sweep\.tolerances = \[\]"),
        ([1e-2, 0.0], r"sweep\.tolerances\[1\] = 0\.0"),
        ([-1e-3], r"sweep\.tolerances\[0\] = -0\.001"),
        ([1e-2, 1.5], r"sweep\.tolerances\[1\] = 1\.5"),
        ([1e-2, float("nan")], r"sweep\.tolerances\[1\] = nan"),
        ([1e-3, 1e-2], r"sweep\.tolerances\[1\] = 0\.01: it is looser"),
        ([1e-2, 1e-3, 1e-3], r"sweep\.tolerances\[2\] = 0\.001: the value 0\.001 is listed twice"),
        ("1e-3", r"sweep\.tolerances = '1e-3'"),
    ],
)
def test_validate_tolerances_rejects_bad_list(tolerances, match):
    with pytest.raises(ValueError, match=match):
        validate_tolerances(tolerances)


def test_sweep_config_rejects_bad_tolerances():
    with pytest.raises(ValueError, match=r"sweep\.tolerances\[1\] = 0\.01"):
        SweepConfig(tolerances=(1e-3, 1e-2), quad_tolerances=())
    with pytest.raises(ValueError, match=r"sweep\.quad_tolerances\[0\] = 1e-06: expected one of sweep\.tolerances"):
        SweepConfig(tolerances=(1e-3, 1e-5), quad_tolerances=(1e-6,))
    with pytest.raises(ValueError, match=r"sweep\.tolerances\[2\] = 0\.001: the value 0\.001 is listed twice"):
        apply_density_check_overrides(DensityCheckConfig(), ["sweep.tolerances=[1e-2, 1e-3, 1e-3]"])


def test_sweep_rejects_bad_tolerances_passed_directly():
    sweep = SweepConfig(tolerances=(1e-3,), quad_tolerances=())
    object.__setattr__(sweep, "tolerances", (1e-3, -1e-4))  # Bypasses the config check on purpose.
    with pytest.raises(ValueError, match=r"sweep\.tolerances\[1\] = -0\.0001"):
        sweep_tolerances(_zero_field_model(1), sweep)


def test_config_files_load():
    one = load_density_check_config(CONFIGS / "density-check-1d.toml")
    assert one == DensityCheckConfig()
    assert one.mixture.means == ((-2.8,), (-0.9,), (2.0,))
    assert one.mixture.probabilities == pytest.approx((1 / 3,) * 3)
    assert one.sweep.tolerances == (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8)
    assert one.sweep.threshold == 1e-3
    two = load_density_check_config(CONFIGS / "density-check-2d.toml")
    assert two.mixture.dim == 2
    assert two.conditioning.method == "infocnf"


def test_config_rejects_bad_values():
    config = DensityCheckConfig()
    with pytest.raises(ValueError, match=r"unknown setting 'sweep\.tolerance'"):
        apply_density_check_overrides(config, ["sweep.tolerance=1e-3"])
    with pytest.raises(ValueError, match=r"invalid mixture\.means\[1\] = \[1, 2, 3\]"):
        apply_density_check_overrides(config, ["mixture.means=[0.0, [1, 2, 3]]"])
    with pytest.raises(ValueError, match=r"invalid mixture\.variance = 0"):
        apply_density_check_overrides(config, ["mixture.variance=0"])
    with pytest.raises(ValueError, match=r"invalid mixture\.means\[2\] = \[20\.0\]: expected a mean inside"):
        apply_density_check_overrides(config, ["mixture.means=[-2.8, -0.9, 20.0]"])
    with pytest.raises(ValueError, match=r"invalid mixture\.weights = \[1\.0, 2\.0\]"):
        apply_density_check_overrides(config, ["mixture.weights=[1.0, 2.0]"])


# Mixture, training and outputs -----------------------------------------------------------------


def test_mixture_log_prob_integrates_to_one():
    config = DensityCheckConfig()
    grid, log_cell_volume = grid_points(config.sweep, dim=1)
    assert abs(riemann_log_integral(mixture_log_prob(config.mixture, grid), log_cell_volume)) < 1e-12


def test_sample_mixture_matches_weights():
    config = apply_density_check_overrides(DensityCheckConfig(), ["mixture.weights=[1.0, 2.0, 1.0]"])
    x, labels = sample_mixture(config.mixture, 40_000, torch.Generator().manual_seed(0))
    assert x.shape == (40_000, 1)
    fractions = torch.bincount(labels, minlength=3).double() / len(labels)
    torch.testing.assert_close(fractions, torch.tensor([0.25, 0.5, 0.25], dtype=torch.float64), atol=0.01, rtol=0)
    # Standard error of the mean of 10,000 points with variance 0.4 is 0.006.
    assert float(x[labels == 1].mean()) == pytest.approx(-0.9, abs=0.03)
    assert float(x[labels == 1].var()) == pytest.approx(0.4, abs=0.03)


def test_trained_model_checkpoint_reloads(tmp_path):
    config = apply_density_check_overrides(DensityCheckConfig(), [
        "train.iterations=3", "train.batch_size=32", "model.hidden_dims=[8]", "conditioning.method=ccnf",
    ])
    checkpoint = tmp_path / "model.pt"
    trained = load_or_train_density_model(config, checkpoint)
    assert checkpoint.is_file()
    loaded = load_or_train_density_model(config, checkpoint)
    for (name, a), b in zip(trained.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    # The sweep settings do not change the trained flow, so they reuse the checkpoint.
    resweep = apply_density_check_overrides(config, ["sweep.threshold=1e-4"])
    load_or_train_density_model(resweep, checkpoint)
    other = apply_density_check_overrides(config, ["train.lr=1e-2"])
    with pytest.raises(ValueError, match="trained with other settings"):
        load_or_train_density_model(other, checkpoint)


def test_write_sweep_outputs_files(tmp_path):
    table = sweep_tolerances(_zero_field_model(1, method="ccnf"), _sweep([1e-2, 1e-4], quad_tolerances=[1e-2]))
    paths = write_sweep_outputs(table, tmp_path / "out", threshold=1e-3, title="zero field")
    assert set(paths) == {"csv", "markdown", "plot"}
    read_back = pd.read_csv(paths["csv"])
    assert list(read_back.columns) == list(table.columns)
    np.testing.assert_allclose(read_back["integral"], table["integral"], rtol=1e-15)
    markdown = paths["markdown"].read_text()
    assert markdown.startswith("|   tolerance |   label |")
    assert "Verdict: evaluate at tolerance 0.01" in markdown
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# Command line ----------------------------------------------------------------------------------


def test_cli_density_check_writes_outputs(tmp_path, capsys):
    output = tmp_path / "check"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = main([
        "density-check", "--output", str(output), "--no-progress", "--tracking-uri", uri,
        "--set", "train.iterations=5", "--set", "train.batch_size=32", "--set", "model.hidden_dims=[8]",
        "--set", "sweep.tolerances=[1e-2, 1e-5]", "--set", "sweep.quad_tolerances=[]", "--set", "sweep.points=600",
    ])
    assert code == 0
    for name in ("config.toml", "model.pt", "density_sweep.csv", "density_sweep.md", "density_sweep.png"):
        assert (output / name).is_file(), name
    assert "Verdict:" in capsys.readouterr().out

    # The check is an MLflow run of its own experiment, and a report on that store shows it.
    from mlflow.tracking import MlflowClient

    from infocnf.density_check.tracking import DENSITY_CHECK_EXPERIMENT, report_section

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(DENSITY_CHECK_EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    table = pd.read_csv(output / "density_sweep.csv")
    worst = table.groupby("tolerance")["abs_error"].max()
    assert runs[0].data.metrics["abs_error_at_1e-05"] == pytest.approx(worst[1e-5], rel=1e-12)
    report = tmp_path / "report"
    report.mkdir()
    lines = report_section(report, uri)
    assert "## Density validity: 1-D tolerance sweep" in lines
    assert any("Verdict:" in line for line in lines)
    assert "\n".join(lines).count("Verdict:") == 1
    assert (report / "density_sweep.png").is_file()


def test_report_section_without_density_check(tmp_path):
    from infocnf.density_check.tracking import report_section
    from infocnf.tracking import open_tracking

    # The store exists, as `infocnf ablate` wrote it, but contains no density check.
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    open_tracking(uri, "exp")
    lines = report_section(tmp_path, uri)
    assert any("No density check on this tracking store yet" in line for line in lines)


def test_cli_density_check_rejects_bad_tolerances(tmp_path, capsys):
    code = main(["density-check", "--output", str(tmp_path), "--set", "sweep.tolerances=[1e-3, 1e-2]"])
    assert code == 2
    assert "infocnf density-check: error: invalid sweep.tolerances[1] = 0.01" in capsys.readouterr().err


@pytest.mark.slow
def test_reference_check_passes_at_1e5(tmp_path):
    code = main(["density-check", "--output", str(tmp_path), "--no-progress", "--no-tracking"])
    assert code == 0
    table = pd.read_csv(tmp_path / "density_sweep.csv")
    error = dict(zip(table["tolerance"], table["abs_error"]))
    assert error[1e-5] < 1e-3
    assert error[1e-8] < error[1e-1]
    assert choose_verdict_tolerance(table, 1e-3) >= 1e-5
