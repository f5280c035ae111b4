"""MLflow record of a density check, and the report section that reads the latest one back."""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import pandas as pd

from ..tracking import TAG_PREFIX, log_params, open_tracking
from .config import DensityCheckConfig
from .sweep import choose_verdict_tolerance

__all__ = ["DENSITY_CHECK_EXPERIMENT", "log_density_check", "report_section"]

log = logging.getLogger(__name__)

# Density checks go to their own experiment on the same store as the ablations.
DENSITY_CHECK_EXPERIMENT = "infocnf-density-check"


def log_density_check(
    config: DensityCheckConfig,
    table: pd.DataFrame,
    paths: dict[str, Path],
    tracking_uri: str | None,
    run_name: str,
) -> str:
    """Log one finished sweep as an MLflow run: params, |integral - 1| per tolerance, outputs.

    Returns the run id. Metrics are the worst label's |integral - 1| and NFE at each tolerance,
    named abs_error_at_<tol> and nfe_at_<tol>, and the verdict tolerance (absent when none passes).
    """
    client, _, experiment_id = open_tracking(tracking_uri, DENSITY_CHECK_EXPERIMENT)
    run = client.create_run(
        experiment_id,
        run_name=run_name,
        tags={TAG_PREFIX + "kind": "density_check", TAG_PREFIX + "status": "finished"},
    )
    run_id = run.info.run_id
    flat: dict[str, object] = {}

    def walk(prefix: str, value: object) -> None:
        if isinstance(value, dict):
            for key, sub in value.items():
                walk(f"{prefix}.{key}" if prefix else key, sub)
        else:
            flat[prefix] = value

    walk("", config.to_dict())
    log_params(client, run_id, flat)
    worst = table.groupby("tolerance").agg(abs_error=("abs_error", "max"), nfe=("nfe", "max"))
    for tolerance, row in worst.iterrows():
        if pd.notna(row["abs_error"]):
            client.log_metric(run_id, f"abs_error_at_{tolerance:g}", float(row["abs_error"]))
        if pd.notna(row["nfe"]):
            client.log_metric(run_id, f"nfe_at_{tolerance:g}", float(row["nfe"]))
    verdict = choose_verdict_tolerance(table, config.sweep.threshold)
    if verdict is not None:
        client.log_metric(run_id, "verdict_tolerance", float(verdict))
    for path in paths.values():
        client.log_artifact(run_id, str(path))
    client.set_terminated(run_id, "FINISHED")
    log.info("logged density check as MLflow run %s in experiment %s", run_id, DENSITY_CHECK_EXPERIMENT)
    return run_id


def report_section(out: Path, tracking_uri: str | None) -> list[str]:
    """Markdown lines with the latest density check on this store, copying its table and plot."""
    client, _, experiment_id = open_tracking(tracking_uri, DENSITY_CHECK_EXPERIMENT, create=False)
    runs = []
    if experiment_id is not None:
        runs = client.search_runs([experiment_id], order_by=["attributes.start_time DESC"], max_results=20)
    runs = [r for r in runs if r.info.status == "FINISHED"]
    if not runs:
        return [
            "## Density validity: 1-D tolerance sweep",
            "",
            "No density check on this tracking store yet: run `infocnf density-check --tracking-uri URI` "
            "with the same store, then rebuild the report.",
            "",
        ]
    run = runs[0]
    lines = ["## Density validity: 1-D tolerance sweep", ""]
    with tempfile.TemporaryDirectory() as tmp:
        try:
            table_path = Path(client.download_artifacts(run.info.run_id, "density_sweep.csv", tmp))
            plot_path = Path(client.download_artifacts(run.info.run_id, "density_sweep.png", tmp))
            markdown_path = Path(client.download_artifacts(run.info.run_id, "density_sweep.md", tmp))
        except Exception as exc:  # A run without its outputs is reported, not fatal.
            log.warning("density check run %s has no outputs (%s)", run.info.run_id, exc)
            return lines + [f"The latest density check (run {run.info.run_id}) has no stored outputs.", ""]
        shutil.copy(plot_path, out / "density_sweep.png")
        shutil.copy(table_path, out / "density_sweep.csv")
        lines += [
            f"MLflow run `{run.info.run_id}` ({run.info.run_name}): ∫p(x) dx by a log-space Riemann sum at each "
            f"solver tolerance, cross-checked with scipy.integrate.quad.",
            "",
            # The stored Markdown ends with the verdict line.
            markdown_path.read_text().strip(),
            "",
            "![|∫p − 1| and NFE against tolerance](density_sweep.png)",
            "",
        ]
    return lines
