"""The grid runner against a real temporary MLflow store: skip, resume, failure and end to end."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from infocnf.grid import parse_grid
from infocnf.report import build_report, load_runs
from infocnf.runner import run_grid
from infocnf.tracking import TAG_PREFIX, open_tracking

TINY_BASE = {
    "data": {"max_examples": 64},
    "model": {"hidden_dims": [8], "num_blocks": 1},
    "solver": {"eval_tolerance": 1e-3, "extra_eval_tolerances": [1e-4], "tolerance": {"value": 1e-3}},
    "train": {"epochs": 2, "batch_size": 32, "eval_batch_size": 64},
}


def _tiny_grid(factors=None, seeds=(0,), name="tiny"):
    factors = factors or {"conditioning": {"key": "conditioning.method", "levels": ["none", "infocnf"]}}
    return parse_grid({"grid": {"name": name, "seeds": list(seeds)}, "base": TINY_BASE, "factors": factors})


def _uri(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def _runs(tmp_path, experiment):
    client, _, experiment_id = open_tracking(_uri(tmp_path), experiment)
    return client, client.search_runs([experiment_id])


def test_run_grid_one_run_per_cell_seed(tmp_path):
    grid = _tiny_grid(seeds=(0, 1))
    summary = run_grid(grid, _uri(tmp_path), "exp", runs_dir=tmp_path / "runs")
    assert summary.finished == 4
    assert summary.failed == 0
    client, runs = _runs(tmp_path, "exp")
    assert len(runs) == 4
    for run in runs:
        assert run.info.status == "FINISHED"
        assert run.data.tags[TAG_PREFIX + "status"] == "finished"
        assert run.data.params["train.epochs"] == "2"
        assert "final_test_bits_per_dim" in run.data.metrics
        assert len(client.get_metric_history(run.info.run_id, "train_loss")) == 2
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"config.toml", "history.csv", "metrics.json"} <= artifacts
    pairs = {(r.data.tags[TAG_PREFIX + "cell_id"], r.data.tags[TAG_PREFIX + "seed"]) for r in runs}
    assert len(pairs) == 4


def test_run_grid_rerun_skips_finished_runs(tmp_path):
    grid = _tiny_grid()
    run_grid(grid, _uri(tmp_path), "exp", runs_dir=tmp_path / "runs")
    again = run_grid(grid, _uri(tmp_path), "exp", runs_dir=tmp_path / "runs")
    assert again.skipped == 2
    assert again.started == 0
    assert again.finished == 0
    _, runs = _runs(tmp_path, "exp")
    assert len(runs) == 2


class _InterruptAfterFirstEpoch:
    def on_epoch_end(self, trainer, row):
        if row["epoch"] == 1:
            raise KeyboardInterrupt


def test_run_grid_interrupted_run_resumes(tmp_path):
    grid = _tiny_grid()
    with pytest.raises(KeyboardInterrupt):
        run_grid(grid, _uri(tmp_path), "exp", runs_dir=tmp_path / "runs",
                 make_callbacks=lambda cell, seed: [_InterruptAfterFirstEpoch()])
    _, runs = _runs(tmp_path, "exp")
    assert len(runs) == 1
    assert runs[0].info.status == "KILLED"
    summary = run_grid(grid, _uri(tmp_path), "exp", runs_dir=tmp_path / "runs")
    assert summary.resumed == 1
    assert summary.finished == 2
    client, runs = _runs(tmp_path, "exp")
    assert len(runs) == 2
    resumed = [r for r in runs if r.info.run_id == summary.run_ids[0]][0]
    assert resumed.data.tags[TAG_PREFIX + "status"] == "finished"
    history = Path(resumed.data.tags[TAG_PREFIX + "output_dir"]) / "history.csv"
    assert len(history.read_text().strip().splitlines()) == 1 + 2  # header + two epochs


def test_run_grid_diverging_cell_fails(tmp_path):
    factors = {"stability": {"levels": [
        {"name": "diverges", "train.divergence_threshold": 1e-3},
        {"name": "ok", "train.divergence_threshold": 1e6},
    ]}}
    grid = _tiny_grid(factors=factors)
    summary = run_grid(grid, _uri(tmp_path), "exp", runs_dir=tmp_path / "runs")
    assert summary.failed == 1
    assert summary.finished == 1
    _, runs = _runs(tmp_path, "exp")
    by_cell = {r.data.tags[TAG_PREFIX + "cell_id"]: r for r in runs}
    failed = by_cell["stability=diverges"]
    assert failed.info.status == "FAILED"
    assert failed.data.tags[TAG_PREFIX + "status"] == "diverged"
    assert "lower train.lr" in failed.data.tags[TAG_PREFIX + "reason"]
    assert by_cell["stability=ok"].info.status == "FINISHED"
    again = run_grid(grid, _uri(tmp_path), "exp", runs_dir=tmp_path / "runs")
    assert again.skipped == 2
    assert again.skipped_failed == 1


def test_run_grid_bad_store_raises_clear_error(tmp_path):
    grid = _tiny_grid()
    with pytest.raises(ValueError, match="cannot open MLflow tracking store .*does not exist"):
        run_grid(grid, f"sqlite:///{tmp_path / 'missing' / 'mlflow.db'}", "exp", runs_dir=tmp_path / "runs")
    with pytest.raises(ValueError, match="no server responded"):
        run_grid(grid, "http://127.0.0.1:9", "exp", runs_dir=tmp_path / "runs")


def test_report_end_to_end_matches_mlflow_values(tmp_path):
    factors = {
        "conditioning": {"key": "conditioning.method", "levels": ["ccnf", "infocnf"]},
        "tolerance": {"key": "solver.tolerance.strategy", "levels": ["fixed", "learned"]},
    }
    grid = _tiny_grid(factors=factors, seeds=(0, 1))
    run_grid(grid, _uri(tmp_path), "exp", runs_dir=tmp_path / "runs")
    index = build_report("exp", tmp_path / "report", tracking_uri=_uri(tmp_path))
    text = index.read_text()
    assert "## Table 1" in text
    for name in ("table1.md", "table1.csv", "table1.tex", "curves.png", "failures.csv"):
        assert (tmp_path / "report" / name).is_file(), name
    assert list((tmp_path / "report").glob("tolerances_*.png"))
    import pandas as pd

    table = pd.read_csv(tmp_path / "report" / "table1.csv")
    client = MlflowClient(_uri(tmp_path))
    runs = load_runs("exp", _uri(tmp_path))
    for _, row in table.iterrows():
        values = [client.get_run(r).data.metrics["final_test_bits_per_dim"]
                  for r in runs[runs["cell_id"] == row["cell"]]["run_id"]]
        assert row["test bits/dim mean"] == pytest.approx(sum(values) / len(values), abs=1e-12)
        assert row["seeds"] == 2
    base = table[(table["conditioning"] == "ccnf") & (table["tolerance"] == "fixed")].iloc[0]
    assert base["Δ error (points)"] == 0
    latex = (tmp_path / "report" / "table1.tex").read_text()
    assert r"$\pm$" in latex
    assert all(symbol not in latex for symbol in "±Δ–")


def _ablate(grid_path, tmp_path, env):
    return subprocess.Popen(
        [sys.executable, "-m", "infocnf.cli", "ablate", str(grid_path), "--tracking-uri", _uri(tmp_path),
         "--runs-dir", str(tmp_path / "runs"), "--no-progress"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )


@pytest.mark.slow
def test_ablate_killed_midway_completes_on_rerun(tmp_path):
    import tomli_w

    base = json.loads(json.dumps(TINY_BASE))
    # With all of digits' training images (max_examples 0) an epoch takes 1.0 to 1.3 s on one thread here,
    # so the kill below lands after the first run's first checkpoint and before its last epoch.
    base["data"]["max_examples"] = 0
    base["train"]["epochs"] = 3
    raw = {"grid": {"name": "kill", "seeds": [0, 1]}, "base": base,
           "factors": {"conditioning": {"key": "conditioning.method", "levels": ["none", "infocnf"]}}}
    grid_path = tmp_path / "kill.toml"
    grid_path.write_text(tomli_w.dumps(raw))
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "OMP_NUM_THREADS": "1"}
    proc = _ablate(grid_path, tmp_path, env)
    deadline = time.time() + 300
    while time.time() < deadline and not list((tmp_path / "runs").glob("*/*/*/checkpoints/last.pt")):
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    proc = _ablate(grid_path, tmp_path, env)
    output, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, output
    # The rerun continues the killed run from its checkpoint instead of starting it over.
    assert "resumed from" in output, output
    assert "after its last epoch" not in output, output
    _, runs = _runs(tmp_path, "infocnf-kill")
    assert len(runs) == 4
    assert {r.data.tags[TAG_PREFIX + "status"] for r in runs} == {"finished"}


def test_report_unknown_experiment_creates_nothing(tmp_path):
    uri = _uri(tmp_path)
    open_tracking(uri, "exists")
    with pytest.raises(ValueError, match="experiment 'nope' not found in the MLflow store"):
        build_report("nope", tmp_path / "out", tracking_uri=uri)
    assert not (tmp_path / "out").exists()
    assert MlflowClient(uri).get_experiment_by_name("nope") is None


def test_sqlite_store_keeps_artifacts_beside_database(tmp_path):
    grid = _tiny_grid()
    run_grid(grid, _uri(tmp_path), "exp", runs_dir=tmp_path / "runs")
    client, runs = _runs(tmp_path, "exp")
    for run in runs:
        assert run.info.artifact_uri.startswith((tmp_path / "mlartifacts").as_uri())
