"""Reports from MLflow: Table 1 (mean +- std over seeds, change vs CCNF/fixed), failures and an index."""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd

from .tracking import TAG_PREFIX, open_tracking

__all__ = ["load_runs", "aggregate_table", "format_table", "tolerance_stability", "build_report", "TABLE_METRICS"]

log = logging.getLogger(__name__)

# Table columns: (name in the table, MLflow metric, scale). Test error is shown in percent.
TABLE_METRICS = (
    ("test error %", "final_test_error", 100.0),
    ("test bits/dim", "final_test_bits_per_dim", 1.0),
    ("test bits/dim marginal", "final_test_bits_per_dim_marginal", 1.0),
    ("train NFE forward", "final_train_nfe_forward", 1.0),
    ("train NFE backward", "final_train_nfe_backward", 1.0),
)
_CONDITIONING_ORDER = {"none": 0, "ccnf": 1, "infocnf": 2}
_TOLERANCE_ORDER = {"fixed": 0, "manual": 1, "learned": 2}


def load_runs(experiment: str, tracking_uri: str | None = None) -> pd.DataFrame:
    """Read every run of an experiment into a DataFrame: one row per run, with params, metrics and tags.

    Columns: run_id, cell_id, seed, status (the harness outcome), batch_size, conditioning,
    tolerance, lr, and every final_* metric under its MLflow name.
    """
    client, uri, experiment_id = open_tracking(tracking_uri, experiment, create=False)
    if experiment_id is None:
        raise ValueError(
            f"experiment {experiment!r} not found in the MLflow store {uri}; run `infocnf ablate GRID` first, "
            f"or check --experiment and --tracking-uri"
        )
    rows = []
    page_token = None
    while True:
        page = client.search_runs([experiment_id], max_results=1000, page_token=page_token)
        for run in page:
            tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
            row = {
                "run_id": run.info.run_id,
                "cell_id": tags.get(TAG_PREFIX + "cell_id", run.info.run_name),
                "seed": int(tags.get(TAG_PREFIX + "seed", params.get("seed", "0"))),
                "status": tags.get(TAG_PREFIX + "status", "unknown"),
                "reason": tags.get(TAG_PREFIX + "reason", ""),
                "kind": tags.get(TAG_PREFIX + "kind", "cnf"),
                "batch_size": int(float(params.get("train.batch_size", "nan"))) if "train.batch_size" in params else -1,
                "conditioning": params.get("conditioning.method", ""),
                "tolerance": params.get("solver.tolerance.strategy", ""),
                "lr": float(params["train.lr"]) if "train.lr" in params else math.nan,
            }
            row.update({k: v for k, v in metrics.items() if k.startswith("final_")})
            rows.append(row)
        page_token = page.token
        if not page_token:
            break
    return pd.DataFrame(rows)


def _sort_in_table_order(frame: pd.DataFrame, first: list[str], then: list[str]) -> pd.DataFrame:
    """Sort rows by the ``first`` columns, conditioning, tolerance strategy, then the ``then`` columns.

    Conditioning runs none, ccnf, infocnf, and tolerance runs fixed, manual, learned. Unknown
    methods come after the known ones. Table 1 and every per-cell part of the report use this order.
    """
    ranked = frame.assign(
        _conditioning=frame["conditioning"].map(_CONDITIONING_ORDER).fillna(len(_CONDITIONING_ORDER)),
        _tolerance=frame["tolerance"].map(_TOLERANCE_ORDER).fillna(len(_TOLERANCE_ORDER)),
    )
    ranked = ranked.sort_values([*first, "_conditioning", "_tolerance", *then], kind="stable")
    return ranked.drop(columns=["_conditioning", "_tolerance"]).reset_index(drop=True)


def _mean_std(values: pd.Series) -> tuple[float, float]:
    values = values.dropna()
    if values.empty:
        return math.nan, math.nan
    # Sample standard deviation over seeds (ddof = 1); NaN for a single seed.
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else math.nan


def aggregate_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Aggregate finished runs per cell: mean and std over seeds, seed count, failed-run count.

    Change columns compare each row with the CCNF/fixed row of the same batch size: test error as
    a difference in percentage points (negative is better), bits/dim and NFE as relative change in
    percent (negative is fewer). Rows without such a baseline get NaN.
    """
    runs = runs[runs["kind"] == "cnf"] if "kind" in runs else runs
    rows = []
    for cell_id, group in runs.groupby("cell_id", sort=False):
        done = group[group["status"] == "finished"]
        first = group.iloc[0]
        row = {
            "cell": cell_id,
            "batch size": int(first["batch_size"]),
            "conditioning": first["conditioning"],
            "tolerance": first["tolerance"],
            "lr": float(first["lr"]),
            "seeds": int(len(done)),
            "failed": int((group["status"] != "finished").sum()),
        }
        for name, metric, scale in TABLE_METRICS:
            series = done[metric] * scale if metric in done else pd.Series(dtype=float)
            row[f"{name} mean"], row[f"{name} std"] = _mean_std(series)
        rows.append(row)
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    table = _sort_in_table_order(table, ["batch size"], ["lr", "cell"])
    table["Δ error (points)"] = math.nan
    table["Δ bits/dim %"] = math.nan
    table["Δ NFE forward %"] = math.nan
    for batch, group in table.groupby("batch size"):
        base = group[(group["conditioning"] == "ccnf") & (group["tolerance"] == "fixed")]
        if base.empty:
            continue
        b = base.iloc[0]
        index = group.index
        table.loc[index, "Δ error (points)"] = table.loc[index, "test error % mean"] - b["test error % mean"]
        table.loc[index, "Δ bits/dim %"] = 100 * (table.loc[index, "test bits/dim mean"] / b["test bits/dim mean"] - 1)
        table.loc[index, "Δ NFE forward %"] = 100 * (
            table.loc[index, "train NFE forward mean"] / b["train NFE forward mean"] - 1
        )
    return table


def _pm(mean: float, std: float, digits: int) -> str:
    if not np.isfinite(mean):
        return "–"
    if not np.isfinite(std):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _signed(value: float, digits: int) -> str:
    return "–" if not np.isfinite(value) else f"{value:+.{digits}f}"


def format_table(table: pd.DataFrame) -> pd.DataFrame:
    """Human-readable Table 1: "mean ± std" strings, signed changes, dashes for missing values."""
    out = pd.DataFrame(
        {
            "batch": table["batch size"],
            "conditioning": table["conditioning"],
            "tolerance": table["tolerance"],
            "lr": table["lr"].map(lambda v: f"{v:g}"),
            "test error %": [_pm(m, s, 2) for m, s in zip(table["test error % mean"], table["test error % std"])],
            "test bits/dim": [_pm(m, s, 3) for m, s in zip(table["test bits/dim mean"], table["test bits/dim std"])],
            "NFE fwd": [_pm(m, s, 1) for m, s in zip(table["train NFE forward mean"], table["train NFE forward std"])],
            "NFE bwd": [_pm(m, s, 1) for m, s in zip(table["train NFE backward mean"], table["train NFE backward std"])],
            "seeds": table["seeds"],
            "failed": table["failed"],
            "Δ error (points)": table["Δ error (points)"].map(lambda v: _signed(v, 2)),
            "Δ bits/dim %": table["Δ bits/dim %"].map(lambda v: _signed(v, 2)),
            "Δ NFE fwd %": table["Δ NFE forward %"].map(lambda v: _signed(v, 1)),
        }
    )
    # A grid factor outside these columns (a solver setting, say) gives rows that would print
    # alike, so the cell id, which names every factor level, is shown next to them.
    if table.duplicated(["batch size", "conditioning", "tolerance", "lr"], keep=False).any():
        out.insert(4, "cell", table["cell"])
    return out


def tolerance_stability(runs: pd.DataFrame, bpd_threshold: float = 1e-3, error_threshold: float = 0.5) -> pd.DataFrame:
    """Per finished run, the largest change of test metrics when the evaluation tolerance tightens.

    Each run evaluated its selected checkpoint on the test set at the evaluation tolerance and at
    every extra tolerance (final_test_bits_per_dim_at_<tol>, final_test_error_at_<tol>). Returns
    one row per run with the largest |change| of bits/dim and of test error (in points), and a
    flag when either passes its threshold.
    """
    pattern = re.compile(r"^final_test_bits_per_dim_at_([0-9.e+-]+)$")
    rows = []
    for _, run in runs[runs["status"] == "finished"].iterrows():
        tolerances = sorted(
            (float(m.group(1)), m.group(1)) for key in run.index if (m := pattern.match(key)) and pd.notna(run[key])
        )
        if not tolerances:
            continue
        base_bpd = run["final_test_bits_per_dim"]
        base_error = run.get("final_test_error", math.nan)
        bpd_change = max(abs(run[f"final_test_bits_per_dim_at_{t}"] - base_bpd) for _, t in tolerances)
        error_changes = [
            abs(run.get(f"final_test_error_at_{t}", math.nan) - base_error) * 100 for _, t in tolerances
        ]
        error_change = max(error_changes) if all(np.isfinite(error_changes)) else math.nan
        moved = bpd_change > bpd_threshold or (np.isfinite(error_change) and error_change > error_threshold)
        rows.append(
            {
                "cell": run["cell_id"],
                "seed": run["seed"],
                "eval tolerance": run.get("final_eval_tolerance", math.nan),
                "tighter tolerances": ", ".join(label for _, label in tolerances),
                "max |Δ bits/dim|": bpd_change,
                "max |Δ error| (points)": error_change,
                "moved": "yes" if moved else "no",
            }
        )
    return pd.DataFrame(rows)


def _format_stability(stability: pd.DataFrame) -> pd.DataFrame:
    """Format the stability table for Markdown: two significant digits, "–" for a missing value as in Table 1."""
    out = stability.copy()
    for column in ("eval tolerance", "max |Δ bits/dim|", "max |Δ error| (points)"):
        out[column] = out[column].map(lambda v: f"{v:.2g}" if np.isfinite(v) else "–")
    # A bare | in a header ends the Markdown cell, so the absolute-value bars are escaped.
    return out.rename(columns=lambda name: name.replace("|", "\\|"))


_SIGN_NOTE = (
    "Mean ± sample standard deviation over seeds (finished runs only). Test error and bits/dim are "
    "of the model selected on the validation split, evaluated at the fixed evaluation tolerance. "
    "NFE is the mean number of vector-field evaluations per training iteration, summed over CNF "
    "blocks (forward solve; backward pass separately). Δ columns compare with the CCNF / fixed row "
    "of the same batch size: test error as a difference in percentage points, bits/dim and NFE as "
    "relative change in percent; negative means lower (better)."
)


def _latex_symbols(text: str) -> str:
    # Plain pdflatex rejects these Unicode characters; use their LaTeX commands.
    return text.replace("±", r"$\pm$").replace("Δ", r"$\Delta$").replace("–", "--")


def build_report(experiment: str, out_dir: str | Path, tracking_uri: str | None = None) -> Path:
    """Write Table 1 (Markdown, CSV, LaTeX), failures, figures and index.md; returns the index path."""
    from .latent_ode.report import latent_ode_section
    from .report_figures import plot_curves, plot_tolerance_distributions

    out = Path(out_dir)
    runs = load_runs(experiment, tracking_uri)
    if runs.empty:
        raise ValueError(f"experiment {experiment!r} has no runs; run `infocnf ablate GRID` first or check --experiment")
    out.mkdir(parents=True, exist_ok=True)
    # MLflow lists runs newest first. Sorting them like Table 1 orders the per-cell figures, their
    # legends and the stability rows the way the table orders its rows.
    cnf_runs = _sort_in_table_order(runs[runs["kind"] == "cnf"], ["batch_size"], ["lr", "cell_id", "seed"])
    table = aggregate_table(cnf_runs) if not cnf_runs.empty else pd.DataFrame()
    sections = [f"# Report: {experiment}", ""]
    sections.append(f"{len(runs)} runs: {int((runs['status'] == 'finished').sum())} finished, "
                    f"{int((runs['status'] != 'finished').sum())} not finished.")
    sections.append("")
    if not table.empty:
        pretty = format_table(table)
        table.to_csv(out / "table1.csv", index=False)
        (out / "table1.md").write_text(pretty.to_markdown(index=False, disable_numparse=True) + "\n\n" + _SIGN_NOTE + "\n")
        (out / "table1.tex").write_text(_latex_symbols(pretty.to_latex(index=False, escape=True)))
        sections += ["## Table 1", "", pretty.to_markdown(index=False, disable_numparse=True), "", _SIGN_NOTE, "",
                     "Files: [table1.md](table1.md), [table1.csv](table1.csv) (raw means and stds), "
                     "[table1.tex](table1.tex).", ""]
        figures = plot_curves(experiment, cnf_runs, out, tracking_uri)
        figures += plot_tolerance_distributions(experiment, cnf_runs, out, tracking_uri)
        if figures:
            sections += ["## Figures", ""]
            for title, path in figures:
                sections += [f"### {title}", "", f"![{title}]({path.name})", ""]
    stability = tolerance_stability(cnf_runs) if not cnf_runs.empty else pd.DataFrame()
    if not stability.empty:
        stability.to_csv(out / "tolerance_stability.csv", index=False)
        moved = int((stability["moved"] == "yes").sum())
        sections += [
            "## Density validity: metrics at tighter evaluation tolerances",
            "",
            f"Each run re-evaluated its selected checkpoint on the test set at tighter tolerances. "
            f"{moved} of {len(stability)} runs moved by more than 0.001 bits/dim or 0.5 error points.",
            "",
            _format_stability(stability).to_markdown(index=False, disable_numparse=True),
            "",
        ]
    sections += latent_ode_section(experiment, runs, out, tracking_uri)
    sections += _density_check_section(out, tracking_uri)
    sections += _failures_section(runs, out)
    index = out / "index.md"
    index.write_text("\n".join(sections))
    log.info("wrote report of %s to %s", experiment, index)
    return index


_FAILURE_COLUMNS = ["cell_id", "seed", "status", "reason", "run_id"]


def _failures_section(runs: pd.DataFrame, out: Path) -> list[str]:
    """Write failures.csv and failures_per_cell.csv, and return the index section on failed runs.

    failures.csv has one row per run that did not finish, with its full reason. failures_per_cell.csv
    counts such runs per cell. Both files and the index tables list cells in Table 1's order, seeds ascending.
    """
    ordered = _sort_in_table_order(runs, ["batch_size"], ["lr", "cell_id", "seed"])
    failed = ordered["status"] != "finished"
    failures = ordered.loc[failed, _FAILURE_COLUMNS]
    failures.to_csv(out / "failures.csv", index=False)
    # groupby(sort=False) keeps the cells in the order of their first row, which is Table 1's.
    counts = failed.groupby(ordered["cell_id"], sort=False).sum().astype(int).rename("failed runs")
    counts.rename_axis("cell_id").to_csv(out / "failures_per_cell.csv")
    files = ("Files: [failures.csv](failures.csv) (one row per failed or unfinished run), "
             "[failures_per_cell.csv](failures_per_cell.csv).")
    if failures.empty:
        return ["## Failed or unfinished runs", "", f"None: all {len(runs)} runs finished.", "", files, ""]
    # The index shows each reason's first line, cut at 200 characters; failures.csv keeps it whole.
    index_failures = failures.assign(reason=failures["reason"].map(lambda r: (r.splitlines() or [""])[0][:200]))
    return [
        "## Failed or unfinished runs per cell",
        "",
        counts.to_frame().to_markdown(),
        "",
        index_failures.to_markdown(index=False),
        "",
        files,
        "",
    ]


def _density_check_section(out: Path, tracking_uri: str | None) -> list[str]:
    """Build the section of the latest density check on the same store, or a line saying how to add one."""
    from .density_check.tracking import report_section

    return report_section(out, tracking_uri)
