"""The benchmark package: well-formed timings, memory, profile splits that add up, fits and reports."""

import json
import math
import re

import pytest
import torch

from bench.__main__ import main
from bench.harness import measure_harness
from bench.profile_split import profile_iteration, split_events
from bench.report import render_markdown, solver_budget, write_results
from bench.scaling import fit_line, fit_power_law
from bench.suite import BenchOptions, quick_options, run_suite
from bench.targets import evaluate_targets
from bench.timing import measure_peak_memory, summarize, time_iterations
from bench.workloads import TrainingStep, digits_workload, mnist_workload
from bench.field_cost import euler_chain, measure_field_cost

CPU = torch.device("cpu")
PART_KEYS = ("field_forward_s", "field_backward_s", "solver_forward_s", "solver_backward_s", "other_s")


@pytest.fixture(scope="module")
def tiny_digits():
    return digits_workload(hidden_dims=(8,))


def test_summarize_quartiles_of_known_values():
    spread = summarize([5.0, 1.0, 4.0, 2.0, 3.0])
    assert spread.median == 3.0
    assert spread.q25 == 2.0
    assert spread.q75 == 4.0
    assert spread.min == 1.0
    assert spread.max == 5.0
    assert spread.n == 5


def test_summarize_empty_raises():
    with pytest.raises(ValueError, match="empty list"):
        summarize([])


def test_fit_line_recovers_exact_line():
    fit = fit_line([1, 2, 3, 4], [3, 5, 7, 9])
    assert fit.slope == pytest.approx(2.0, abs=1e-12)
    assert fit.intercept == pytest.approx(1.0, abs=1e-12)
    assert fit.r_squared == pytest.approx(1.0, abs=1e-12)


def test_fit_power_law_recovers_exponent():
    x = [32, 64, 128, 256]
    fit = fit_power_law(x, [3.0 * v**1.5 for v in x])
    assert fit.slope == pytest.approx(1.5, abs=1e-9)
    assert fit.log_log


def test_fit_line_one_distinct_x_raises():
    with pytest.raises(ValueError, match="two distinct x values"):
        fit_line([2, 2, 2], [1, 2, 3])


def test_time_iterations_records_are_well_formed(tiny_digits):
    step = TrainingStep(tiny_digits, batch_size=4, tolerance=1e-2, device=CPU)
    records = time_iterations(step, CPU, warmup=1, repeats=2)
    assert len(records) == 2
    for record in records:
        assert record.elapsed_s > 0
        assert record.cpu_s >= 0
        assert record.nfe_forward > 0
        assert 0 < record.nfe_backward <= record.nfe_forward
    assert len(step.last_stats) == 2  # One SolveStats per CNF block of the digits config.


def test_training_step_rejects_bad_sizes(tiny_digits):
    with pytest.raises(ValueError, match="invalid batch size 0"):
        TrainingStep(tiny_digits, batch_size=0, tolerance=1e-3, device=CPU)
    with pytest.raises(ValueError, match="invalid tolerance"):
        TrainingStep(tiny_digits, batch_size=4, tolerance=0.0, device=CPU)


def test_peak_memory_grows_with_batch(tiny_digits):
    readings = []
    for batch in (4, 64):
        step = TrainingStep(tiny_digits, batch_size=batch, tolerance=1e-2, device=CPU)
        step()
        readings.append(measure_peak_memory(step, CPU))
    assert readings[0].peak_bytes > 0
    assert readings[1].peak_bytes > readings[0].peak_bytes
    assert readings[0].nfe_forward > 0
    assert "profile_memory" in readings[0].method


@pytest.mark.parametrize("adjoint", [False, True])
def test_profile_split_parts_add_up(tiny_digits, adjoint):
    step = TrainingStep(tiny_digits, batch_size=4, tolerance=1e-2, device=CPU, adjoint=adjoint)
    step()
    split, (nfe_forward, nfe_backward) = profile_iteration(step, CPU)
    parts = [getattr(split, key) for key in PART_KEYS]
    assert sum(parts) == pytest.approx(split.iteration_s, rel=1e-9)
    for key, value in zip(PART_KEYS, parts):
        assert value >= 0, key
    assert split.field_forward_s > 0
    assert split.field_backward_s > 0
    assert split.solver_forward_s > 0
    assert 0 < split.field_share < 1
    assert split.field_share + split.overhead_share == pytest.approx(1.0, abs=1e-12)
    phases = sum(p["total_s"] for p in split.phases.values())
    assert phases == pytest.approx(split.iteration_s, rel=1e-9)
    assert 0 < split.counts["field_ops"] < split.counts["ops"]
    assert 0 < split.counts["field_backward_nodes"] < split.counts["backward_nodes"]
    assert nfe_forward > 0
    assert nfe_backward > 0


def test_split_events_without_iteration_raises():
    with pytest.raises(ValueError, match="expected one 'bench.iteration' range"):
        split_events([])


def test_field_cost_has_one_entry_per_block(tiny_digits):
    step = TrainingStep(tiny_digits, batch_size=4, tolerance=1e-2, device=CPU)
    cost = measure_field_cost(step, rounds=3, evaluations=4)
    assert len(cost.forward_s) == 2
    assert len(cost.backward_s) == 2
    assert all(value > 0 for value in cost.forward_s + cost.backward_s)
    assert len(cost.overhead_shares) == 3
    assert cost.iteration_s.n == 3
    assert all(share < 1 for share in cost.overhead_shares)
    assert min(cost.overhead_shares) <= cost.overhead_share <= max(cost.overhead_shares)


def test_field_cost_times_euler_floor(tiny_digits):
    step = TrainingStep(tiny_digits, batch_size=4, tolerance=1e-2, device=CPU)
    cost = measure_field_cost(step, rounds=3, evaluations=4)
    assert len(cost.floor_shares) == 3
    assert cost.floor_iteration_s.n == 3
    assert cost.floor_iteration_s.min > 0
    assert min(cost.floor_shares) <= cost.floor_share <= max(cost.floor_shares)
    assert len(cost.steps) == 3
    assert all(steps >= 2 for steps in cost.steps)  # At least one step in each of the two blocks.
    # The floor iterations restore the real iteration's stats for the caller.
    assert all(stats.method == "dopri5" for stats in step.last_stats)


def test_field_cost_without_floor_leaves_it_empty(tiny_digits):
    step = TrainingStep(tiny_digits, batch_size=4, tolerance=1e-2, device=CPU)
    cost = measure_field_cost(step, rounds=2, evaluations=2, floor=False)
    assert cost.floor_share is None
    assert cost.floor_iteration_s is None
    assert cost.floor_shares == []


class _DiagonalField(torch.nn.Module):
    def __init__(self, rates: torch.Tensor):
        super().__init__()
        self.rates = rates

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return z * self.rates


def test_euler_chain_linear_field_exact():
    # For f(z) = diag(a) z an Euler step multiplies z by 1 + h a, and a Rademacher probe e gives
    # e^T diag(a) e = sum(a) exactly, so the summed divergence is NFE x trace.
    rates = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    z0 = torch.tensor([[1.0, 2.0, -3.0], [0.5, 0.0, 1.0]], dtype=torch.float64, requires_grad=True)
    z, total = euler_chain(_DiagonalField(rates), z0, torch.tensor(0.5, dtype=torch.float64), 5, 0.1)
    expected = z0.detach() * (1 + 0.1 * rates) ** 5
    assert torch.allclose(z, expected, rtol=0, atol=1e-14)
    assert torch.allclose(total, torch.full((2,), 5 * 1.5, dtype=torch.float64), rtol=0, atol=1e-14)


def test_field_cost_rejects_zero_rounds(tiny_digits):
    step = TrainingStep(tiny_digits, batch_size=4, tolerance=1e-2, device=CPU)
    with pytest.raises(ValueError, match="invalid rounds 0"):
        measure_field_cost(step, rounds=0)


def test_mnist_workload_trains_one_step():
    workload = mnist_workload(examples=8, shape=(1, 8, 8), num_scales=2, hidden_dims=(4,), num_blocks=1)
    assert workload.shape == (1, 8, 8)
    assert workload.images.dtype == torch.uint8
    step = TrainingStep(workload, batch_size=2, tolerance=1e-2, device=CPU)
    nfe_forward, nfe_backward = step()
    assert len(step.last_stats) == 3  # Two blocks on the first scale (before and after the squeeze), one on the last.
    assert nfe_forward >= 3
    assert nfe_backward >= 3


def test_harness_without_mlflow_times_each_step(tiny_digits, tmp_path):
    cost = measure_harness(tiny_digits, 8, 1e-2, epochs=1, iterations_per_epoch=3, device=CPU, mlflow=False,
                           workdir=tmp_path)
    assert cost.hand_loop_s.n == 2
    assert cost.trainer_s.n == 2
    assert cost.trainer_cpu_s.n == 2
    assert cost.paired_difference_s.n == 2
    assert cost.hand_loop_nfe.n == 2
    assert cost.trainer_s.min > 0
    assert cost.hand_loop_s.min > 0
    assert 0 < cost.trainer_fit_s
    assert cost.trainer_nfe_mean > 0
    assert math.isfinite(cost.trainer_overhead_share)
    assert cost.trainer_overhead_share < 1
    assert cost.mlflow == {}


def test_harness_rejects_one_iteration_per_epoch(tiny_digits):
    with pytest.raises(ValueError, match="iterations per epoch >= 2"):
        measure_harness(tiny_digits, 8, 1e-2, epochs=1, iterations_per_epoch=1, device=CPU, mlflow=False)


@pytest.mark.slow
def test_harness_with_mlflow_times_every_event(tiny_digits, tmp_path):
    cost = measure_harness(tiny_digits, 8, 1e-2, epochs=2, iterations_per_epoch=3, device=CPU, mlflow=True,
                           workdir=tmp_path)
    mlflow = cost.mlflow
    assert mlflow["event_calls"]["on_start"] == 1
    assert mlflow["event_calls"]["on_epoch_end"] == 2
    assert mlflow["event_calls"]["on_end"] == 1
    assert 0 < mlflow["share_of_fit"] < 1
    assert mlflow["total_s"] == pytest.approx(sum(mlflow["event_s"].values()), rel=1e-12)


def test_evaluate_targets_combines_solver_and_trainer_overhead():
    results = {
        "settings": {"reference_batch": 64, "reference_tolerance": 1e-5},
        "profile": {"cells": [{"batch_size": 64, "tolerance": 1e-5, "split": {"overhead_share": 0.05},
                               "field_cost": {"overhead_share": 0.06}}]},
        "harness": {"trainer_overhead_share": 0.02, "mlflow": {"share_of_fit": 0.03}},
    }
    rows = {row["name"]: row for row in evaluate_targets(results)}
    combined = rows["solver + harness overhead"]
    assert combined["value"] == pytest.approx(1 - 0.95 * 0.98, abs=1e-12)
    assert combined["met"] is True
    assert rows["MLflow logging overhead"]["met"] is False
    assert rows["the same, cost model without the profiler"]["value"] == 0.06
    assert "lower bound of solver + harness overhead" not in rows  # No Euler-chain floor measured.


def test_evaluate_targets_floor_with_trainer():
    results = {
        "settings": {"reference_batch": 64, "reference_tolerance": 1e-5},
        "profile": {"cells": [{"batch_size": 64, "tolerance": 1e-5, "split": {"overhead_share": 0.4},
                               "field_cost": {"overhead_share": 0.4, "floor_share": 0.08}}]},
        "harness": {"trainer_overhead_share": 0.03, "mlflow": {"share_of_fit": 0.01}},
    }
    rows = {row["name"]: row for row in evaluate_targets(results)}
    assert rows["lower bound: the same loop with each solve replaced by an Euler chain of equal NFE"]["value"] == 0.08
    floor = rows["lower bound of solver + harness overhead"]
    assert floor["value"] == pytest.approx(1 - 0.92 * 0.97, abs=1e-12)
    assert floor["met"] is None


def test_evaluate_targets_unmeasured_is_none():
    rows = evaluate_targets({"settings": {"reference_batch": 64, "reference_tolerance": 1e-5}})
    assert all(row["met"] is None for row in rows)


def test_run_suite_writes_json_markdown_and_plot(tmp_path):
    options = quick_options(sections=("digits", "profile", "adjoint"), batch_sizes=(4, 8), tolerances=(1e-2,),
                            reference_batch=4, reference_tolerance=1e-2, digits_hidden_dims=(8,))
    results = run_suite(options, CPU)
    results["command"] = "python -m bench (test)"
    history = [dict(results, label="before")]
    paths = write_results(results, tmp_path, history=history)
    assert {p.name for p in paths} == {"results.json", "results.png", "RESULTS.md"}
    loaded = json.loads((tmp_path / "results.json").read_text())
    cells = loaded["digits"]["cells"]
    assert [(c["batch_size"], c["tolerance"]) for c in cells] == [(4, 1e-2), (8, 1e-2)]
    for cell in cells:
        assert cell["time_s"]["min"] <= cell["time_s"]["median"] <= cell["time_s"]["max"]
        assert cell["peak_memory_bytes"] > 0
        assert len(cell["load_average"]) == 3
    assert "backprop" in loaded["scaling"]["memory_vs_batch"]
    assert "adjoint" in loaded["scaling"]["memory_vs_batch"]
    assert "0.01" in loaded["scaling"]["time_vs_batch"]
    markdown = (tmp_path / "RESULTS.md").read_text()
    assert "## Targets" in markdown
    assert "**A --quick run:**" in markdown
    full = render_markdown({**results, "settings": {**results["settings"], "quick": False}})
    assert "**A --quick run:**" not in full
    assert "## Hot-path changes, before and after" in markdown
    assert "| 4 | 0.01 |" in markdown
    assert (tmp_path / "results.png").stat().st_size > 0


def test_cli_render_rewrites_report_only(tmp_path):
    results = {
        "created": "2026-01-01T00:00:00", "label": "stored", "command": "python -m bench (stored)",
        "settings": {"reference_batch": 64, "reference_tolerance": 1e-5},
        "machine": {"cpu": "test cpu", "cpu_count": 2, "memory_gib": 1.0, "device": "cpu", "torch_threads": 1,
                    "python": "3", "torch": "2", "torchdiffeq": "0.2", "mlflow": "3"},
        "load_average_start": [0.5, 0.5, 0.5], "load_average_end": [0.5, 0.5, 0.5], "elapsed_s": 1.0,
    }
    stored = tmp_path / "stored.json"
    stored.write_text(json.dumps(results))
    out = tmp_path / "out"
    assert main(["--render", str(stored), "--output-dir", str(out)]) == 0
    assert json.loads((out / "results.json").read_text()) == results
    markdown = (out / "RESULTS.md").read_text()
    assert "python -m bench (stored)" in markdown
    assert "## Targets" in markdown


def test_render_markdown_marks_shared_machine():
    results = {
        "created": "2026-01-01T00:00:00", "label": "", "settings": {"reference_batch": 64, "reference_tolerance": 1e-5},
        "machine": {"cpu": "test cpu", "cpu_count": 2, "memory_gib": 1.0, "device": "cpu", "torch_threads": 1,
                    "python": "3", "torch": "2", "torchdiffeq": "0.2", "mlflow": "3"},
        "load_average_start": [3.0, 3.0, 3.0], "load_average_end": [3.0, 3.0, 3.0], "elapsed_s": 1.0,
    }
    markdown = render_markdown(results)
    assert "The machine was shared" in markdown


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--sections", "bogus"], "unknown section 'bogus'"),
        (["--threads", "0"], "invalid --threads 0"),
        (["--device", "tpu"], "invalid --device 'tpu'"),
        (["--compare", "missing.json"], "results file not found"),
        (["--render", "missing.json"], "results file not found"),
    ],
)
def test_cli_bad_input_exits_2(argv, message, tmp_path, capsys):
    assert main([*argv, "--output-dir", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()


def test_solver_budget_arithmetic():
    # Iteration 100 ms with 40 % overhead: field 60 ms. Euler-chain iteration 70 ms with 10 %
    # overhead: 7 ms besides the field, so the solver costs 40 - 7 = 33 ms over 6 steps. At a
    # 10 % limit the field allows 60 / 9 = 6.67 ms besides it, less than the 7 ms already used.
    cell = {"batch_size": 64, "tolerance": 1e-5, "field_cost": {
        "iteration_s": {"median": 0.100}, "floor_iteration_s": {"median": 0.070},
        "overhead_share": 0.40, "floor_share": 0.10, "steps": [5, 6, 7], "clock": "cpu"}}
    text = solver_budget(cell, limit=0.10)[0]
    assert "an iteration takes 100.0 ms" in text
    assert "field evaluations take about 60.0 ms" in text
    assert "of which 7.0 ms are not field evaluations" in text
    assert "costs about 33.0 ms over 6 solver steps (5.50 ms per step" in text
    assert "allows 6.7 ms besides the field" in text
    assert text.endswith("which leaves nothing for the solver.")
    roomy = solver_budget(cell, limit=0.20)[0]
    assert roomy.endswith("which leaves 8.0 ms for the solver (1.33 ms per step).")


def test_solver_budget_needs_floor():
    cell = {"batch_size": 64, "tolerance": 1e-5, "field_cost": {"overhead_share": 0.4, "floor_share": None}}
    assert solver_budget(cell) == []


def _stored_record() -> dict:
    return {
        "created": "2026-01-01T00:00:00", "label": "stored",
        "settings": {"reference_batch": 64, "reference_tolerance": 1e-5},
        "machine": {"cpu": "test cpu", "cpu_count": 2, "memory_gib": 1.0, "device": "cpu", "torch_threads": 1,
                    "python": "3", "torch": "2", "torchdiffeq": "0.2", "mlflow": "3"},
        "load_average_start": [0.5, 0.5, 0.5], "load_average_end": [0.5, 0.5, 0.5], "elapsed_s": 1.0,
    }


def _without(record: dict, parent: str, key: str) -> dict:
    copy = json.loads(json.dumps(record))
    del copy[parent][key]
    return copy


@pytest.mark.parametrize(
    "content, message",
    [
        ({"label": "x"}, "missing keys created, settings, machine, load_average_start, load_average_end, elapsed_s"),
        ([], "expected a JSON object, got a list"),
        ("text", "expected a JSON object, got a str"),
        (_without(_stored_record(), "machine", "torch"), "missing keys machine.torch"),
        (_without(_stored_record(), "settings", "reference_batch"), "missing keys settings.reference_batch"),
        (dict(_stored_record(), machine=[]), "'machine' is not a JSON object"),
        (dict(_stored_record(), load_average_end=None), "load_average_end is None, expected a list"),
    ],
)
def test_cli_render_rejects_other_json(content, message, tmp_path, capsys):
    stored = tmp_path / "stored.json"
    stored.write_text(json.dumps(content))
    out = tmp_path / "out"
    assert main(["--render", str(stored), "--output-dir", str(out)]) == 2
    error = capsys.readouterr().err
    assert f"invalid results file {stored}: " in error
    assert message in error
    assert not out.exists()


def test_cli_render_rejects_directory(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["--render", str(tmp_path), "--output-dir", str(out)]) == 2
    assert f"invalid results file {tmp_path}: it is a directory" in capsys.readouterr().err
    assert not out.exists()


def test_cli_render_help_names_results_json():
    from bench.__main__ import build_parser

    help_text = next(a.help for a in build_parser()._actions if a.dest == "render")
    assert "results.json, RESULTS.md and results.png" in help_text


def test_evaluate_targets_says_why_unmeasured():
    settings = {"reference_batch": 64, "reference_tolerance": 1e-5}
    profile = {"cells": [{"batch_size": 64, "tolerance": 1e-5, "split": {"overhead_share": 0.05}}]}
    no_harness = {row["name"]: row for row in evaluate_targets({"settings": settings, "profile": profile})}
    assert no_harness["MLflow logging overhead"]["where"] == "not measured (harness section not run)"
    assert no_harness["Trainer overhead over the minimal loop"]["where"] == "not measured (harness section not run)"
    assert no_harness["solver + harness overhead"]["where"] == "not measured (harness section not run)"
    assert no_harness["the same, cost model without the profiler"]["where"] == (
        "not measured (the profiled cell has no cost model)"
    )
    solver = no_harness["solver, loss and optimizer overhead (profiled minimal loop)"]
    assert solver["where"] == "digits, batch 64, tolerance 1e-05, one profiled iteration"

    mlflow_off = {"settings": settings, "harness": {"trainer_overhead_share": 0.02, "mlflow": {}}}
    rows = {row["name"]: row for row in evaluate_targets(mlflow_off)}
    assert rows["MLflow logging overhead"]["where"] == "not measured (MLflow off)"
    assert rows["solver + harness overhead"]["where"] == "not measured (profile section not run)"

    other_cell = {"settings": settings, "profile": {"cells": [dict(profile["cells"][0], batch_size=8)]}}
    rows = {row["name"]: row for row in evaluate_targets(other_cell)}
    assert rows["solver + harness overhead"]["where"] == "not measured (no profiled cell at batch 64, tolerance 1e-05)"


def test_render_markdown_target_status_without_limit():
    results = dict(_stored_record(), profile={"cells": [
        {"batch_size": 64, "tolerance": 1e-5, "nfe_forward": 10, "nfe_backward": 20,
         "split": {"overhead_share": 0.05, "iteration_s": 1.0, "field_forward_s": 0.5, "field_backward_s": 0.45,
                   "solver_forward_s": 0.02, "solver_backward_s": 0.02, "other_s": 0.01, "top_overhead_ops": []},
         "load_average": [0.5, 0.5, 0.5]}]})
    markdown = render_markdown(results)
    assert "| solver, loss and optimizer overhead (profiled minimal loop) | 5.0 % | - | - |" in markdown
    assert "| solver + harness overhead | n/a | <= 10 % | n/a | not measured (harness section not run) |" in markdown


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"batch_sizes": (0,)}, "invalid batch_sizes 0 (--batch-sizes): each value must be >= 1"),
        ({"mnist_batch_size": 0}, "invalid mnist_batch_size 0 (--mnist-batch-size): must be >= 1"),
        ({"reference_batch": 0}, "invalid reference_batch 0 (--reference-batch): must be >= 1"),
        ({"tolerances": (1e-3, 0.0)}, "invalid tolerances 0.001,0 (--tolerances): each value must be > 0"),
        ({"reference_tolerance": -1.0}, "invalid reference_tolerance -1 (--reference-tolerance): must be > 0"),
        ({"warmup": -1}, "invalid warmup -1 (--warmup): must be >= 0"),
        ({"mnist_repeats": 0}, "invalid mnist_repeats 0 (--mnist-repeats): must be >= 1"),
    ],
)
def test_bench_options_name_invalid_field(changes, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        BenchOptions(**changes)
