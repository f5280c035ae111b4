"""The LatentODE section of a report: metrics per prior (mean +- std over seeds) and trajectories."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import pandas as pd

from ..tracking import open_tracking
from .figures import load_trajectories, plot_trajectories

__all__ = ["latent_ode_section", "LATENT_ODE_METRICS"]

log = logging.getLogger(__name__)

# (column, MLflow metric): MSEs are against the noise-free spiral unless marked observed.
LATENT_ODE_METRICS = (
    ("MSE fit (window)", "final_test_mse_window"),
    ("MSE fit vs noisy points", "final_test_mse_window_observed"),
    ("MSE extrapolation forward", "final_test_mse_forward"),
    ("MSE extrapolation backward", "final_test_mse_backward"),
    ("direction error % (classifier)", "final_test_error"),
    ("direction error % (probe on z0)", "final_test_probe_error"),
    ("-ELBO per value", "final_test_neg_elbo_per_value"),
)


def _pm(values: pd.Series, scale: float = 1.0) -> str:
    values = values.dropna() * scale
    if values.empty:
        return "–"
    if len(values) == 1:
        return f"{values.iloc[0]:.4g}"
    return f"{values.mean():.4g} ± {values.std(ddof=1):.2g}"


def latent_ode_section(experiment: str, runs: pd.DataFrame, out: Path, tracking_uri: str | None) -> list[str]:
    """Markdown lines of the LatentODE section; writes latent_ode.csv and latent_ode_trajectories.png."""
    done = runs[(runs["kind"] == "latent_ode") & (runs["status"] == "finished")]
    if done.empty:
        return []
    rows = []
    for cell_id, group in done.groupby("cell_id", sort=False):
        row = {"cell": cell_id, "seeds": len(group)}
        for name, metric in LATENT_ODE_METRICS:
            scale = 100.0 if "error" in metric else 1.0
            row[name] = _pm(group[metric], scale) if metric in group else "–"
        rows.append(row)
    table = pd.DataFrame(rows)
    raw = done[["cell_id", "seed", "run_id"] + [m for _, m in LATENT_ODE_METRICS if m in done]]
    raw.to_csv(out / "latent_ode.csv", index=False)
    lines = [
        "## LatentODE on bi-directional spirals",
        "",
        "Mean ± sample standard deviation over seeds. MSEs are against the noise-free spiral (the fit "
        "on the observed window, and extrapolation before and after it), except the one marked noisy. "
        "The probe is a logistic regression on the latent mean, fitted on training spirals.",
        "",
        table.to_markdown(index=False, disable_numparse=True),
        "",
        "Per-run values: [latent_ode.csv](latent_ode.csv).",
        "",
    ]
    figure = _trajectory_figure(experiment, done, out, tracking_uri)
    if figure is not None:
        lines += [f"![test spirals: truth, observed points, fit and extrapolation]({figure.name})", ""]
    return lines


def _trajectory_figure(experiment: str, done: pd.DataFrame, out: Path, tracking_uri: str | None) -> Path | None:
    client, _, _ = open_tracking(tracking_uri, experiment)
    seed = int(done["seed"].min())
    sets = {}
    with tempfile.TemporaryDirectory() as tmp:
        for cell_id, group in done[done["seed"] == seed].groupby("cell_id", sort=False):
            run_id = group["run_id"].iloc[0]
            try:
                path = client.download_artifacts(run_id, "trajectories.npz", str(Path(tmp) / run_id))
            except Exception as exc:  # A run without the artifact is left out with a log line.
                log.warning("run %s has no trajectories.npz (%s); left out of the trajectory figure", run_id, exc)
                continue
            sets[f"{cell_id} (seed {seed})"] = load_trajectories(path)
        if not sets:
            return None
        path = out / "latent_ode_trajectories.png"
        try:
            plot_trajectories(sets, path)
        except ValueError as exc:
            log.warning("trajectory figure skipped: %s", exc)
            return None
    return path if path.is_file() else None


