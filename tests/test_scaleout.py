"""Scale-out: several workers on one grid through an Optuna storage, and data-parallel training under torchrun.

Workers are real processes on real stores. The tests use PostgreSQL and an MLflow tracking
server when INFOCNF_TEST_POSTGRES_URL and INFOCNF_TEST_MLFLOW_URI are set, and .ci/services
starts both on 127.0.0.1. The same tests run on SQLite and an Optuna journal file without them.
"""

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import tomli_w
import torch

from infocnf.claims import MlflowClaimer, OptunaClaimer
from infocnf.cli import main
from infocnf.data import Split
from infocnf.evaluate import evaluate
from infocnf.grid import parse_grid
from infocnf.tolerance import FixedPlan
from infocnf.tracking import TAG_PREFIX, open_tracking
from infocnf.train import Trainer
from infocnf.work_queue import grid_study_name, open_storage, read_progress

# One tiny digits run: 64 examples, one CNF block of hidden width 8, loose tolerance, 1 epoch.
SCALEOUT_BASE = {
    "data": {"max_examples": 64},
    "model": {"hidden_dims": [8], "num_blocks": 1},
    "solver": {"eval_tolerance": 1e-3, "extra_eval_tolerances": [], "tolerance": {"value": 1e-3}},
    "train": {"epochs": 1, "batch_size": 32, "eval_batch_size": 64, "device": "cpu"},
}
# The journal variant repeats the SQLite checks on another storage, so only the slow run has it.
BACKENDS = ["sqlite", pytest.param("journal", marks=pytest.mark.slow), "postgresql"]

# A worker process: imports everything, reports ready, waits for the go file, then runs the CLI,
# so that every worker reaches the storage within about a millisecond of the others.
_CLI_WORKER = """
import os, sys, time
import torch
torch.set_num_threads(1)
import optuna, mlflow, infocnf.claims, infocnf.runner, infocnf.train
from infocnf.cli import main
go, ready = sys.argv[1:3]
open(ready, "w").close()
while not os.path.exists(go):
    time.sleep(0.001)
sys.exit(main(sys.argv[3:]))
"""

# A worker that claims and releases runs without training them, as fast as it can.
_CLAIM_WORKER = """
import json, logging, os, sys, time
logging.basicConfig(level=logging.INFO)
from infocnf.claims import MlflowClaimer, OptunaClaimer
from infocnf.grid import parse_grid
from infocnf.tracking import open_tracking
go, ready, out, storage, study, tracking, experiment, raw = sys.argv[1:9]
grid = parse_grid(json.loads(raw))
client, _, experiment_id = open_tracking(tracking, experiment)
open(ready, "w").close()
while not os.path.exists(go):
    time.sleep(0.001)
claimer = OptunaClaimer(storage, study_name=study, heartbeat_interval_s=1, grace_period_s=30, wait_for_running=False)
claimed = []
for cell, seed, claim in claimer.claims(grid, MlflowClaimer(client, experiment_id)):
    claimed.append([cell.cell_id, seed, claim.action])
    claimer.release(cell, seed, "finished")
with open(out, "w") as f:
    json.dump(claimed, f)
"""


def _env() -> dict[str, str]:
    # One thread per process: two per process oversubscribe a 2-core machine badly.
    return {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true",
            "GLOO_SOCKET_IFNAME": "lo"}


@pytest.fixture(params=BACKENDS)
def backend(request, tmp_path) -> dict[str, str]:
    """Queue storage URL, tracking URI, study and experiment names for one storage kind."""
    name = f"test-{uuid.uuid4().hex[:10]}"
    if request.param == "postgresql":
        storage, tracking = os.environ.get("INFOCNF_TEST_POSTGRES_URL"), os.environ.get("INFOCNF_TEST_MLFLOW_URI")
        if not storage or not tracking:
            pytest.skip("INFOCNF_TEST_POSTGRES_URL and INFOCNF_TEST_MLFLOW_URI are not set (.ci/services sets both)")
        return {"storage": storage, "tracking": tracking, "study": name, "experiment": name}
    storage = f"sqlite:///{tmp_path / 'queue.db'}" if request.param == "sqlite" else f"journal:{tmp_path / 'queue.log'}"
    return {"storage": storage, "tracking": f"sqlite:///{tmp_path / 'mlflow.db'}", "study": name, "experiment": name}


def _grid_raw(name: str, levels: list, seeds: list[int], epochs: int = 1) -> dict:
    base = json.loads(json.dumps(SCALEOUT_BASE))
    base["train"]["epochs"] = epochs
    return {"grid": {"name": name, "seeds": seeds}, "base": base,
            "factors": {"lr": {"key": "train.lr", "levels": levels}}}


def _start_together(commands: list[list[str]], cwd: Path) -> list[subprocess.Popen]:
    """Start one process per command; each waits for the go file, created once all are ready."""
    procs = []
    for i, command in enumerate(commands):
        log = open(cwd / f"worker{i}.log", "w")
        procs.append(subprocess.Popen(
            [sys.executable, "-c", *command[:1], str(cwd / "go"), str(cwd / f"ready{i}"), *command[1:]],
            cwd=cwd, env=_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        ))
    deadline = time.time() + 180
    while not all((cwd / f"ready{i}").exists() for i in range(len(commands))):
        assert time.time() < deadline, "workers did not start within 180 s"
        assert all(p.poll() is None for p in procs), [(cwd / f"worker{i}.log").read_text() for i in range(len(procs))]
        time.sleep(0.05)
    (cwd / "go").touch()
    return procs


def _wait(procs: list[subprocess.Popen], cwd: Path, timeout: float) -> list[str]:
    logs = []
    for i, proc in enumerate(procs):
        try:
            proc.wait(timeout=timeout)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        logs.append((cwd / f"worker{i}.log").read_text())
    return logs


def _trials(storage_url: str, study: str) -> list:
    storage = open_storage(storage_url, create=False)
    return storage.get_all_trials(storage.get_study_id_from_name(study))


def test_open_storage_invalid_url_raises(tmp_path):
    with pytest.raises(ValueError, match="invalid --storage 'redis://h'.*journal:PATH"):
        open_storage("redis://h")
    with pytest.raises(ValueError, match="missing.*does not exist"):
        open_storage(f"sqlite:///{tmp_path / 'missing' / 'q.db'}")
    with pytest.raises(ValueError, match="queue.log does not exist"):
        open_storage(f"journal:{tmp_path / 'queue.log'}", create=False)
    with pytest.raises(ValueError, match="must exceed the heartbeat interval"):
        OptunaClaimer(f"sqlite:///{tmp_path / 'q.db'}", heartbeat_interval_s=10, grace_period_s=10)


def test_grid_study_name_changes_with_configs():
    grid = parse_grid(_grid_raw("g", [1e-3, 2e-3], [0]))
    same = parse_grid(_grid_raw("g", [1e-3, 2e-3], [0]))
    other = parse_grid(_grid_raw("g", [1e-3, 3e-3], [0]))
    assert grid_study_name(grid) == grid_study_name(same)
    assert grid_study_name(grid) != grid_study_name(other)
    assert grid_study_name(grid).startswith("g-")


def test_workers_starting_together_claim_each_run_once(backend, tmp_path):
    # 4 cells x 3 seeds claimed and released as fast as three processes can, all from one instant.
    raw = _grid_raw("race", [1e-3, 2e-3, 3e-3, 4e-3], [0, 1, 2])
    storage, study = backend["storage"], backend["study"]
    open_tracking(backend["tracking"], backend["experiment"])
    commands = [[_CLAIM_WORKER, str(tmp_path / f"claimed{i}.json"), storage, study, backend["tracking"],
                 backend["experiment"], json.dumps(raw)] for i in range(3)]
    logs = _wait(_start_together(commands, tmp_path), tmp_path, timeout=240)
    claimed = [tuple(c) for i in range(3) for c in json.loads((tmp_path / f"claimed{i}.json").read_text())]
    assert len(claimed) == 12, logs
    assert len({(cell, seed) for cell, seed, _ in claimed}) == 12
    assert {action for _, _, action in claimed} == {"start"}
    trials = _trials(storage, study)
    assert len(trials) == 12
    assert {t.state.name for t in trials} == {"COMPLETE"}
    assert sum("queued 12 runs" in log for log in logs) == 1


def test_status_shows_done_running_failed_pending(tmp_path, capsys):
    grid = parse_grid(_grid_raw("status", [1e-3, 2e-3], [0, 1]))
    storage = f"sqlite:///{tmp_path / 'queue.db'}"
    client, _, experiment_id = open_tracking(f"sqlite:///{tmp_path / 'mlflow.db'}", "status")
    claimer = OptunaClaimer(storage, heartbeat_interval_s=60, grace_period_s=300, wait_for_running=False)
    claims = claimer.claims(grid, MlflowClaimer(client, experiment_id))
    cell, seed, _ = next(claims)
    claimer.release(cell, seed, "finished")
    cell, seed, _ = next(claims)
    claimer.release(cell, seed, "diverged")
    running_cell, running_seed, _ = next(claims)
    assert main(["status", "--storage", storage, "--grid", "status"]) == 0
    out = capsys.readouterr().out
    assert "grid status (study status-" in out
    assert "4 runs: 1 done, 1 running, 1 failed, 1 pending" in out
    assert f"running  {running_cell.cell_id} seed={running_seed}  worker {claimer.worker}" in out
    assert "failed   lr=0.001 seed=1: diverged" in out
    claims.close()  # Hands the held run back: it is queued again as a second attempt.
    progress = read_progress(storage, "status")[0]
    assert progress.count("pending") == 2
    assert progress.count("running") == 0
    assert [r.attempts for r in progress.runs if r.cell_id == running_cell.cell_id and r.seed == running_seed] == [2]
    assert main(["status", "--storage", storage, "--grid", "other"]) == 2
    assert "no grid 'other' is queued" in capsys.readouterr().err


def test_run_grid_with_optuna_claimer_runs_and_skips(tmp_path):
    from infocnf.runner import run_grid

    grid = parse_grid(_grid_raw("one", [1e-3, 2e-3], [0]))
    storage, tracking = f"sqlite:///{tmp_path / 'queue.db'}", f"sqlite:///{tmp_path / 'mlflow.db'}"
    summary = run_grid(grid, tracking, "exp", runs_dir=tmp_path / "runs",
                       claimer=OptunaClaimer(storage, heartbeat_interval_s=1, grace_period_s=5))
    assert summary.finished == 2
    assert {t.state.name for t in _trials(storage, grid_study_name(grid))} == {"COMPLETE"}
    # The same study has nothing left to claim; a new study re-queues the grid, and MLflow skips it.
    again = run_grid(grid, tracking, "exp", runs_dir=tmp_path / "runs",
                     claimer=OptunaClaimer(storage, heartbeat_interval_s=1, grace_period_s=5))
    assert (again.started, again.skipped) == (0, 0)
    fresh = run_grid(grid, tracking, "exp", runs_dir=tmp_path / "runs",
                     claimer=OptunaClaimer(storage, study_name="again", heartbeat_interval_s=1, grace_period_s=5))
    assert (fresh.started, fresh.skipped) == (0, 2)
    client, _, experiment_id = open_tracking(tracking, "exp")
    assert len(client.search_runs([experiment_id])) == 2


def _ablate_command(grid_path: Path, backend: dict[str, str], tmp_path: Path, *extra: str) -> list[str]:
    return [_CLI_WORKER, "ablate", str(grid_path), "--storage", backend["storage"], "--study", backend["study"],
            "--tracking-uri", backend["tracking"], "--experiment", backend["experiment"],
            "--runs-dir", str(tmp_path / "runs"), "--no-progress", "--heartbeat-interval", "1",
            "--grace-period", "4", *extra]


def _mlflow_runs(backend: dict[str, str]):
    client, _, experiment_id = open_tracking(backend["tracking"], backend["experiment"])
    return client, client.search_runs([experiment_id], max_results=1000)


@pytest.mark.slow
def test_ablate_three_workers_finish_grid_once(backend, tmp_path):
    grid_path = tmp_path / "three.toml"
    grid_path.write_text(tomli_w.dumps(_grid_raw("three", [1e-3, 2e-3, 3e-3], [0, 1])))
    procs = _start_together([_ablate_command(grid_path, backend, tmp_path) for _ in range(3)], tmp_path)
    logs = _wait(procs, tmp_path, timeout=900)
    assert [p.returncode for p in procs] == [0, 0, 0], logs
    client, runs = _mlflow_runs(backend)
    keys = [(r.data.tags[TAG_PREFIX + "cell_id"], r.data.tags[TAG_PREFIX + "seed"]) for r in runs]
    assert len(keys) == 6
    assert len(set(keys)) == 6
    assert {r.data.tags[TAG_PREFIX + "status"] for r in runs} == {"finished"}
    for run in runs:
        history = Path(run.data.tags[TAG_PREFIX + "output_dir"]) / "history.csv"
        assert len(history.read_text().strip().splitlines()) == 1 + 1  # header + one epoch, trained once
        assert len(client.get_metric_history(run.info.run_id, "train_loss")) == 1
    trials = _trials(backend["storage"], backend["study"])
    assert len(trials) == 6
    assert {t.state.name for t in trials} == {"COMPLETE"}
    assert {t.user_attrs["worker"].rsplit(":", 1)[1] for t in trials} <= {str(p.pid) for p in procs}
    assert sum("queued 6 runs" in log for log in logs) == 1


@pytest.mark.slow
def test_ablate_killed_worker_cell_completed_by_another(backend, tmp_path):
    grid_path = tmp_path / "kill.toml"
    grid_raw = _grid_raw("kill", [1e-3], [0], epochs=8)
    # With all of digits' training images (max_examples 0) an epoch takes 1.0 to 1.3 s on one thread here,
    # so the loop below kills the holder after its first checkpoint and well before its last epoch.
    grid_raw["base"]["data"]["max_examples"] = 0
    grid_path.write_text(tomli_w.dumps(grid_raw))
    procs = _start_together([_ablate_command(grid_path, backend, tmp_path) for _ in range(2)], tmp_path)
    # Kill whichever worker has claimed the run, once it has a checkpoint: its whole process group.
    deadline = time.time() + 300
    holder = None
    while holder is None:
        assert time.time() < deadline, "no worker reached its first checkpoint within 300 s"
        if list((tmp_path / "runs").glob("*/*/*/checkpoints/last.pt")):
            running = [t for t in _trials(backend["storage"], backend["study"]) if t.state.name == "RUNNING"]
            worker_logs = [(tmp_path / f"worker{i}.log").read_text() for i in range(len(procs))]
            assert running, ["the run finished before the kill", *worker_logs]
            holder = next(p for p in procs if running[0].user_attrs["worker"].endswith(f":{p.pid}"))
        time.sleep(0.2)
    os.killpg(holder.pid, signal.SIGKILL)
    holder.wait()
    survivor = next(p for p in procs if p is not holder)
    logs = _wait([survivor], tmp_path, timeout=600)
    survivor_log = (tmp_path / f"worker{procs.index(survivor)}.log").read_text()
    assert survivor.returncode == 0, logs
    # The survivor resumes from the shared checkpoint, with epochs left to train.
    assert "resumed from" in survivor_log, survivor_log
    assert "after its last epoch" not in survivor_log, survivor_log
    client, runs = _mlflow_runs(backend)
    assert len(runs) == 1
    assert runs[0].data.tags[TAG_PREFIX + "status"] == "finished"
    history = Path(runs[0].data.tags[TAG_PREFIX + "output_dir"]) / "history.csv"
    assert len(history.read_text().strip().splitlines()) == 1 + 8
    trials = sorted(_trials(backend["storage"], backend["study"]), key=lambda t: t.number)
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]
    assert trials[0].user_attrs["worker"].endswith(f":{holder.pid}")
    assert "outcome" not in trials[0].user_attrs
    assert trials[1].user_attrs["worker"].endswith(f":{survivor.pid}")
    assert trials[1].user_attrs["attempt"] == 2


# Deterministic DDP check: a fixed-step solver and the exact divergence draw no random numbers
# inside the forward pass, and the classifier has no dropout, so one process and two ranks see
# the same examples with the same dequantisation noise and must agree up to float32 rounding.
DDP_CONFIG = {
    "seed": 0,
    "data": {"name": "digits", "max_examples": 64},
    "model": {"architecture": "mlp", "hidden_dims": [8], "num_blocks": 1},
    "conditioning": {"method": "infocnf", "classifier_dropout": 0.0},
    "solver": {"method": "rk4", "step_size": 0.25, "divergence": "exact", "eval_tolerance": 1e-3,
               "extra_eval_tolerances": [], "tolerance": {"strategy": "fixed", "value": 1e-3}},
    "train": {"epochs": 4, "batch_size": 64, "eval_batch_size": 64, "eval_every": 4, "device": "cpu"},
}
# Relative tolerance for one process against two ranks: per-rank means and their float64 merge
# round differently from one float32 mean over the batch (measured differences are about 1e-7).
DDP_RTOL = 1e-5


def _train_command(config_path: Path, output: Path, ranks: int) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    command = ["-m", "infocnf.cli", "train", "--config", str(config_path), "--output", str(output), "--no-progress"]
    return (launcher if ranks > 1 else [sys.executable]) + command


def _history(output: Path) -> list[dict[str, float]]:
    import pandas as pd

    return pd.read_csv(output / "history.csv").to_dict("records")


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """One process and two gloo ranks on the same config, each trained once for the module."""
    folder = tmp_path_factory.mktemp("ddp")
    config_path = folder / "config.toml"
    config_path.write_text(tomli_w.dumps(DDP_CONFIG))
    for name, ranks in (("one", 1), ("two", 2)):
        done = subprocess.run(_train_command(config_path, folder / name, ranks), env=_env(), cwd=folder,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout + done.stderr
    return folder


@pytest.mark.slow
def test_ddp_two_ranks_match_one_process(ddp_runs):
    one_process, two_ranks = _history(ddp_runs / "one"), _history(ddp_runs / "two")
    assert len(one_process) == len(two_ranks) == 4
    for row_one, row_two in zip(one_process, two_ranks):
        for key in ("train_loss", "train_bits_per_dim", "train_cross_entropy", "train_error"):
            assert row_two[key] == pytest.approx(row_one[key], rel=DDP_RTOL), (row_one["epoch"], key)
        assert row_two["train_nfe_forward_rank_0"] == row_two["train_nfe_forward_rank_1"] == row_one["train_nfe_forward"]
    state_one = torch.load(ddp_runs / "one" / "checkpoints" / "last.pt", weights_only=False)["model"]
    state_two = torch.load(ddp_runs / "two" / "checkpoints" / "last.pt", weights_only=False)["model"]
    for name, value in state_one.items():
        torch.testing.assert_close(state_two[name], value, rtol=DDP_RTOL, atol=1e-6, msg=name)
    assert not (ddp_runs / "two" / "checkpoints" / "last.tmp").exists()


@pytest.mark.slow
def test_ddp_evaluation_merges_rank_parts_exactly(ddp_runs):
    # Rank r scores the r-th half of the test split with seed + r; merging weights by examples.
    from infocnf.config import load_config

    config = load_config(ddp_runs / "two" / "config.toml")
    trainer = Trainer(config, ddp_runs / "check")
    trainer.model.load_state_dict(torch.load(ddp_runs / "two" / "checkpoints" / "best.pt", weights_only=False)["model"])
    test = trainer.splits.test
    half = len(test) // 2
    parts = [Split(test.images[:half], test.labels[:half]), Split(test.images[half:], test.labels[half:])]
    results = [evaluate(trainer.model, part, lambda: FixedPlan(config.solver, tolerance=config.solver.eval_tolerance),
                        config.train.eval_batch_size, seed=config.seed + 7 + rank) for rank, part in enumerate(parts)]
    expected = (results[0]["bits_per_dim"] * half + results[1]["bits_per_dim"] * (len(test) - half)) / len(test)
    metrics = json.loads((ddp_runs / "two" / "metrics.json").read_text())
    assert metrics["test_bits_per_dim"] == pytest.approx(expected, rel=1e-6)


@pytest.mark.slow
def test_ddp_resumed_run_matches_uninterrupted(ddp_runs):
    # Two ranks killed after their second epoch's checkpoint, then restarted on the same folder.
    output = ddp_runs / "resumed"
    proc = subprocess.Popen(_train_command(ddp_runs / "config.toml", output, 2), env=_env(), cwd=ddp_runs,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not (output / "history.csv").exists() or len((output / "history.csv").read_text().splitlines()) < 3:
        assert time.time() < deadline and proc.poll() is None, "no second epoch within 300 s"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = subprocess.run(_train_command(ddp_runs / "config.toml", output, 2), env=_env(), cwd=ddp_runs,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "resumed from" in done.stdout + done.stderr
    resumed, uninterrupted = _history(output), _history(ddp_runs / "two")
    assert [r["train_loss"] for r in resumed] == pytest.approx([r["train_loss"] for r in uninterrupted], rel=1e-12)


@pytest.mark.slow
def test_ddp_solve_failure_on_one_rank_stops_all(tmp_path):
    # With dopri5 and a budget of 2 steps, a rank whose rows need a third step fails while the
    # other finishes its solve; both must then stop with that status instead of waiting forever.
    config = json.loads(json.dumps(DDP_CONFIG))
    config["solver"].update({"method": "dopri5", "divergence": "hutchinson", "max_num_steps": 2})
    config_path = tmp_path / "config.toml"
    config_path.write_text(tomli_w.dumps(config))
    done = subprocess.run(_train_command(config_path, tmp_path / "run", 2), env=_env(), cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["status"] == "step_budget_exceeded"
    assert "of 2: the solve needed more than solver.max_num_steps = 2 steps" in metrics["reason"]
    assert metrics["epochs_completed"] == 0


def test_data_parallel_uneven_batch_raises():
    from infocnf.distributed import DataParallel

    with pytest.raises(ValueError, match="invalid train.batch_size = 30 for 4 ranks.*multiple of 4"):
        DataParallel(0, 4, torch.device("cpu")).wrap(torch.nn.Linear(1, 1), torch.nn.Linear(1, 1), 30, seed=0)


@pytest.mark.slow
def test_torchrun_ablate_logs_nfe_per_rank(tmp_path):
    grid_path = tmp_path / "ddp.toml"
    grid_path.write_text(tomli_w.dumps(_grid_raw("ddp", [1e-3], [0])))
    storage, tracking = f"sqlite:///{tmp_path / 'queue.db'}", f"sqlite:///{tmp_path / 'mlflow.db'}"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               "-m", "infocnf.cli", "ablate", str(grid_path), "--storage", storage, "--tracking-uri", tracking,
               "--runs-dir", str(tmp_path / "runs"), "--no-progress"]
    done = subprocess.run(command, env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    client, _, experiment_id = open_tracking(tracking, "infocnf-ddp")
    runs = client.search_runs([experiment_id])
    assert len(runs) == 1
    metrics = runs[0].data.metrics
    assert runs[0].data.tags[TAG_PREFIX + "status"] == "finished"
    assert {"train_nfe_forward_rank_0", "train_nfe_forward_rank_1", "train_nfe_forward"} <= set(metrics)
    # Logged once, by rank 0: one point per epoch.
    assert len(client.get_metric_history(runs[0].info.run_id, "train_loss")) == 1
