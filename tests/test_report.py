"""Tests of the report against a real MLflow store filled with hand-made runs (no training)."""

import csv
import re

import pandas as pd
import pytest

from infocnf import report_figures
from infocnf.density_check.tracking import report_section
from infocnf.report import build_report, format_table, load_runs
from infocnf.tracking import TAG_PREFIX, open_tracking

# Table 1's row order for one batch size and learning rate.
CELLS = [
    ("none", "fixed"),
    ("none", "learned"),
    ("ccnf", "fixed"),
    ("ccnf", "learned"),
    ("infocnf", "fixed"),
    ("infocnf", "learned"),
]
# Each learned cell samples tolerances in its own decade, so figures scaled one by one would differ.
LOG10_RANGES = {"none": (-6.0, -5.0), "ccnf": (-4.0, -3.0), "infocnf": (-3.0, -2.0)}


def _cell_id(conditioning: str, tolerance: str) -> str:
    return f"conditioning={conditioning},tolerance={tolerance}"


def _log_run(client, experiment_id, tmp_path, conditioning, tolerance, start_time):
    cell_id = _cell_id(conditioning, tolerance)
    tags = {TAG_PREFIX + "cell_id": cell_id, TAG_PREFIX + "seed": "0", TAG_PREFIX + "status": "finished",
            TAG_PREFIX + "kind": "cnf"}
    run_id = client.create_run(experiment_id, start_time=start_time, tags=tags, run_name=cell_id).info.run_id
    params = {"train.batch_size": "64", "conditioning.method": conditioning,
              "solver.tolerance.strategy": tolerance, "train.lr": "0.001", "seed": "0"}
    for key, value in params.items():
        client.log_param(run_id, key, value)
    metrics = {"final_test_bits_per_dim": 1.5, "final_test_bits_per_dim_at_1e-06": 1.5004,
               "final_train_nfe_forward": 40.0, "final_train_nfe_backward": 60.0, "final_eval_tolerance": 1e-5}
    # Unconditional runs have no classifier, so no test error.
    if conditioning != "none":
        metrics.update({"final_test_error": 0.1, "final_test_error_at_1e-06": 0.1})
    for key, value in metrics.items():
        client.log_metric(run_id, key, value)
    for epoch, value in ((1, 1.7), (2, 1.5)):
        client.log_metric(run_id, "test_bits_per_dim", value, step=epoch)
    if tolerance == "learned":
        low, high = LOG10_RANGES[conditioning]
        rows = [{"block": block, "split": split, "log10_tolerance": value}
                for block in (0, 1) for split in ("train", "test") for value in (low, (low + high) / 2, high)]
        folder = tmp_path / run_id
        folder.mkdir()
        pd.DataFrame(rows).to_csv(folder / "tolerances.csv", index=False)
        client.log_artifact(run_id, str(folder / "tolerances.csv"))
    client.set_terminated(run_id, "FINISHED")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A SQLite MLflow store with one finished run per cell, started in Table 1's row order."""
    tmp_path = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client, _, experiment_id = open_tracking(uri, "exp")
    for i, (conditioning, tolerance) in enumerate(CELLS):
        # Start times one second apart, so MLflow's newest-first listing is the exact reverse.
        _log_run(client, experiment_id, tmp_path, conditioning, tolerance, start_time=1_700_000_000_000 + 1000 * i)
    report = build_report("exp", tmp_path / "report", tracking_uri=uri)
    return uri, report.parent


def test_report_store_lists_runs_newest_first(store):
    uri, _ = store
    assert list(load_runs("exp", uri)["cell_id"]) == [_cell_id(*cell) for cell in reversed(CELLS)]


def test_report_sections_follow_table1_order(store):
    _, out = store
    table = pd.read_csv(out / "table1.csv")
    assert list(table["cell"]) == [_cell_id(*cell) for cell in CELLS]
    text = (out / "index.md").read_text()
    learned = [_cell_id(c, t) for c, t in CELLS if t == "learned"]
    positions = [text.index(f"### Learned tolerance distribution: {cell_id}") for cell_id in learned]
    assert positions == sorted(positions)
    stability = pd.read_csv(out / "tolerance_stability.csv")
    assert list(stability["cell"]) == [_cell_id(*cell) for cell in CELLS]


def _markdown_table(section: str) -> list[list[str]]:
    # Split rows at pipes that are not escaped as \|, the way Markdown renderers do.
    lines = [line for line in section.splitlines() if line.startswith("|") and not line.startswith("|:")]
    return [[cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]] for line in lines]


def test_report_stability_missing_error_is_dash(store):
    _, out = store
    text = (out / "index.md").read_text()
    section = text[text.index("## Density validity: metrics at tighter evaluation tolerances"):]
    section = section[: section.index("\n## ")]
    header, *rows = _markdown_table(section)
    assert header == ["cell", "seed", "eval tolerance", "tighter tolerances", r"max \|Δ bits/dim\|",
                      r"max \|Δ error\| (points)", "moved"]
    assert [row[0] for row in rows] == [_cell_id(*cell) for cell in CELLS]
    for row in rows:
        assert len(row) == len(header), row
        expected = "–" if row[0].startswith("conditioning=none") else "0"
        assert row[5] == expected, row[0]
    assert "nan" not in section


def test_report_stability_csv_leaves_missing_error_empty(store):
    # Table 1's CSV keeps raw numbers and leaves a missing value empty, and the stability CSV does the same.
    _, out = store
    with open(out / "table1.csv", newline="") as file:
        table = {row["cell"]: row for row in csv.DictReader(file)}
    with open(out / "tolerance_stability.csv", newline="") as file:
        stability = {row["cell"]: row for row in csv.DictReader(file)}
    unconditional = _cell_id("none", "fixed")
    assert table[unconditional]["test error % mean"] == ""
    assert stability[unconditional]["max |Δ error| (points)"] == ""
    assert stability[_cell_id("ccnf", "fixed")]["max |Δ error| (points)"] == "0.0"
    assert "nan" not in (out / "tolerance_stability.csv").read_text()


def test_report_tolerance_figures_share_y_axis(store, tmp_path, monkeypatch):
    uri, _ = store
    close = report_figures.plt.close
    figures = []
    # Keep the figures open, to read their axes after plot_tolerance_distributions returns.
    monkeypatch.setattr(report_figures.plt, "close", figures.append)
    try:
        written = report_figures.plot_tolerance_distributions("exp", load_runs("exp", uri), tmp_path, uri)
    finally:
        monkeypatch.undo()
    limits = [figure.axes[0].get_ylim() for figure in figures]
    for figure in figures:
        close(figure)
    assert len(written) == 3
    assert len(limits) == 3
    assert limits[0] == limits[1] == limits[2]
    # The shared range spans every cell's samples, -6 (none) to -2 (infocnf), plus 5 % of 4 decades.
    assert limits[0] == pytest.approx((-6.2, -1.8), abs=1e-12)


def _log_outcome(client, experiment_id, conditioning, tolerance, seed, status, reason, start_time):
    """Log a run with no metrics and the given harness outcome; returns its run id."""
    cell_id = _cell_id(conditioning, tolerance)
    tags = {TAG_PREFIX + "cell_id": cell_id, TAG_PREFIX + "seed": str(seed), TAG_PREFIX + "status": status,
            TAG_PREFIX + "kind": "cnf"}
    if reason:
        tags[TAG_PREFIX + "reason"] = reason
    run_id = client.create_run(experiment_id, start_time=start_time, tags=tags, run_name=cell_id).info.run_id
    params = {"train.batch_size": "64", "conditioning.method": conditioning,
              "solver.tolerance.strategy": tolerance, "train.lr": "0.001", "seed": str(seed)}
    for key, value in params.items():
        client.log_param(run_id, key, value)
    client.set_terminated(run_id, "FINISHED" if status == "finished" else "FAILED")
    return run_id


def test_report_failures_in_table_order(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client, _, experiment_id = open_tracking(uri, "fails")
    # (conditioning, tolerance, seed, status, reason), logged in this order, so MLflow lists
    # seed 1 of each cell before seed 0 and the infocnf cell first.
    outcomes = [
        ("none", "fixed", 0, "error", "RuntimeError: out of memory\nTraceback line"),
        ("none", "fixed", 1, "error", "RuntimeError: out of memory"),
        ("ccnf", "fixed", 0, "finished", ""),
        ("ccnf", "fixed", 1, "step_budget_exceeded", "solver took more than 1000 steps"),
        ("infocnf", "learned", 0, "running", ""),
        ("infocnf", "learned", 1, "finished", ""),
    ]
    run_ids = [
        _log_outcome(client, experiment_id, *outcome, start_time=1_700_000_000_000 + 1000 * i)
        for i, outcome in enumerate(outcomes)
    ]
    out = tmp_path / "report"
    build_report("fails", out, tracking_uri=uri)

    expected = [
        [_cell_id(c, t), str(seed), status, reason, run_id]
        for (c, t, seed, status, reason), run_id in zip(outcomes, run_ids)
        if status != "finished"
    ]
    with open(out / "failures.csv", newline="") as file:
        rows = list(csv.reader(file))
    assert rows[0] == ["cell_id", "seed", "status", "reason", "run_id"]
    assert rows[1:] == expected
    with open(out / "failures_per_cell.csv", newline="") as file:
        counts = list(csv.reader(file))
    assert counts == [
        ["cell_id", "failed runs"],
        [_cell_id("none", "fixed"), "2"],
        [_cell_id("ccnf", "fixed"), "1"],
        [_cell_id("infocnf", "learned"), "1"],
    ]

    text = (out / "index.md").read_text()
    section = text[text.index("## Failed or unfinished runs per cell"):]
    tables = _markdown_table(section)
    header_index = tables.index(["cell_id", "seed", "status", "reason", "run_id"])
    index_rows = tables[header_index + 1:]
    # The index keeps each reason's first line only.
    assert index_rows == [[cell, seed, status, reason.splitlines()[0] if reason else "", run_id]
                     for cell, seed, status, reason, run_id in expected]


def test_report_curves_mark_single_epoch(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client, _, experiment_id = open_tracking(uri, "one-epoch")
    run_id = _log_outcome(client, experiment_id, "ccnf", "fixed", 0, "finished", "", start_time=1_700_000_000_000)
    client.log_metric(run_id, "test_bits_per_dim", 1.5, step=1)
    figures = []
    # Keep the figure open, to read its lines after plot_curves returns.
    monkeypatch.setattr(report_figures.plt, "close", figures.append)
    try:
        written = report_figures.plot_curves("one-epoch", load_runs("one-epoch", uri), tmp_path, uri)
    finally:
        monkeypatch.undo()
    lines = [line for ax in figures[0].axes for line in ax.get_lines()]
    report_figures.plt.close(figures[0])
    assert len(written) == 1
    assert len(lines) == 1
    assert list(lines[0].get_xdata()) == [1]
    assert lines[0].get_marker() == "o"
    assert lines[0].get_markersize() > 0


def test_report_missing_default_store_creates_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"MLflow tracking store .*mlflow\.db \(the default store.*--tracking-uri"):
        build_report("exp", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_report_missing_given_store_creates_nothing(tmp_path):
    uri = f"sqlite:///{tmp_path / 'other.db'}"
    with pytest.raises(ValueError, match=re.escape(f"MLflow tracking store {tmp_path / 'other.db'} not found")):
        load_runs("exp", uri)
    with pytest.raises(ValueError, match="pointing at the store that `infocnf ablate` wrote"):
        report_section(tmp_path, uri)
    assert list(tmp_path.iterdir()) == []


def test_open_tracking_creates_store_for_writers(tmp_path):
    # infocnf ablate and infocnf train open the store with create=True and must get a new one.
    uri = f"sqlite:///{tmp_path / 'new.db'}"
    _, _, experiment_id = open_tracking(uri, "exp")
    assert (tmp_path / "new.db").is_file()
    assert experiment_id is not None


def _table_row(cell, conditioning, tolerance):
    row = {"cell": cell, "batch size": 64, "conditioning": conditioning, "tolerance": tolerance, "lr": 1e-3,
           "seeds": 2, "failed": 0, "Δ error (points)": 0.0, "Δ bits/dim %": 0.0, "Δ NFE forward %": 0.0}
    for name in ("test error %", "test bits/dim", "train NFE forward", "train NFE backward"):
        row[f"{name} mean"], row[f"{name} std"] = 1.0, 0.1
    return row


def test_format_table_cell_column_only_when_rows_collide():
    distinct = pd.DataFrame([_table_row("a", "ccnf", "fixed"), _table_row("b", "ccnf", "learned")])
    assert "cell" not in format_table(distinct).columns
    colliding = pd.DataFrame([_table_row("steps=ok", "ccnf", "fixed"), _table_row("steps=tight", "ccnf", "fixed")])
    pretty = format_table(colliding)
    assert list(pretty.columns[:5]) == ["batch", "conditioning", "tolerance", "lr", "cell"]
    assert list(pretty["cell"]) == ["steps=ok", "steps=tight"]
