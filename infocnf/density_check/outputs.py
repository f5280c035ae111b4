"""Files of a density validity sweep: the table as CSV and Markdown, a verdict line and a log-log plot."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from .sweep import choose_verdict_tolerance

__all__ = ["format_verdict", "format_sweep_markdown", "plot_sweep", "write_sweep_outputs"]

# |integral - 1| can be exactly 0 in float64, so the log-scale plot shows such points at this floor.
_PLOT_FLOOR = 1e-17


def format_verdict(table: pd.DataFrame, threshold: float) -> str:
    """Format one line that names the recommended evaluation tolerance, or states that none qualifies."""
    verdict = choose_verdict_tolerance(table, threshold)
    if verdict is None:
        return (f"Verdict: no swept tolerance keeps |∫p − 1| below {threshold:g} down to the tightest one; "
                "add tighter tolerances, or widen the grid box if the halved-grid gap or the quad gap is large.")
    return (f"Verdict: evaluate at tolerance {verdict:g}, the loosest at which |∫p − 1| < {threshold:g} "
            "for every label and at every tighter tolerance.")


def _scientific(value: float, digits: int = 2) -> str:
    return "" if value is None or pd.isna(value) else f"{value:.{digits}e}"


def format_sweep_markdown(table: pd.DataFrame, threshold: float) -> str:
    """Render the sweep as a Markdown table followed by the verdict line."""
    shown = pd.DataFrame({"tolerance": table["tolerance"].map(lambda v: f"{v:.0e}")})
    if table["label"].notna().any():
        shown["label"] = table["label"].map(lambda v: "" if pd.isna(v) else str(int(v)))
    shown["∫p (grid)"] = table["integral"].map(lambda v: "" if pd.isna(v) else f"{v:.10f}")
    shown["\\|∫p − 1\\|"] = table["abs_error"].map(_scientific)
    shown["NFE"] = table["nfe"].map(lambda v: "" if pd.isna(v) else str(int(v)))
    shown["halved-grid gap"] = table["halved_grid_gap"].map(_scientific)
    if table["integral_quad"].notna().any():
        shown["∫p (quad)"] = table["integral_quad"].map(lambda v: "" if pd.isna(v) else f"{v:.10f}")
        shown["\\|grid − quad\\|"] = table["quad_gap"].map(_scientific)
    if table["status"].ne("ok").any():
        shown["status"] = table["status"]
    # A literal | inside a cell would end it, hence the escaped header names. disable_numparse keeps
    # tabulate from reformatting the formatted numbers.
    markdown = shown.to_markdown(index=False, disable_numparse=True, colalign=["right"] * len(shown.columns))
    return markdown + "\n\n" + format_verdict(table, threshold) + "\n"


def plot_sweep(table: pd.DataFrame, threshold: float, path: str | Path, title: str = "") -> None:
    """Save a log-log plot of |∫p − 1| (left, one line per label) and NFE (right) against tolerance."""
    # A bare Figure renders to files without pyplot, so no global backend or display is touched.
    from matplotlib.figure import Figure
    from matplotlib.ticker import ScalarFormatter

    fig = Figure(figsize=(10, 4), layout="constrained")
    ax_error, ax_nfe = fig.subplots(1, 2)
    groups = [(None, table)] if table["label"].isna().all() else list(table.groupby("label"))
    for label, rows in groups:
        name = "p(x)" if label is None else f"p(x | {int(label)})"
        errors = np.maximum(rows["abs_error"].to_numpy(dtype=float), _PLOT_FLOOR)
        ax_error.plot(rows["tolerance"], errors, marker="o", label=f"{name}, grid")
        quad_errors = (rows["integral_quad"] - 1).abs().to_numpy(dtype=float)
        if np.isfinite(quad_errors).any():
            ax_error.plot(rows["tolerance"], np.maximum(quad_errors, _PLOT_FLOOR), linestyle="--", marker="x",
                          label=f"{name}, quad")
    ax_error.axhline(threshold, color="grey", linestyle=":", label=f"threshold {threshold:g}")
    verdict = choose_verdict_tolerance(table, threshold)
    if verdict is not None:
        ax_error.axvline(verdict, color="green", linestyle=":", label=f"verdict {verdict:g}")
    ax_error.set(xscale="log", yscale="log", xlabel="tolerance (atol = rtol)", ylabel="|∫p − 1|")
    ax_error.invert_xaxis()
    ax_error.legend(fontsize="small")
    per_tolerance = table.groupby("tolerance")["nfe"].first()
    ax_nfe.plot(per_tolerance.index, per_tolerance.to_numpy(dtype=float), marker="o")
    ax_nfe.set(xscale="log", yscale="log", xlabel="tolerance (atol = rtol)", ylabel="forward NFE of the grid solve")
    # NFE spans about one decade, where plain integers read better than powers of ten.
    ax_nfe.yaxis.set_major_formatter(ScalarFormatter())
    ax_nfe.yaxis.set_minor_formatter(ScalarFormatter())
    ax_nfe.invert_xaxis()
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=120)


def write_sweep_outputs(table: pd.DataFrame, output_dir: str | Path, threshold: float,
                        title: str = "") -> dict[str, Path]:
    """Write density_sweep.csv, density_sweep.md and density_sweep.png into ``output_dir``.

    Returns their paths under the keys "csv", "markdown" and "plot".
    """
    if not (isinstance(threshold, (int, float)) and math.isfinite(threshold) and threshold > 0):
        raise ValueError(f"invalid threshold = {threshold!r}: expected a number > 0, for example 1e-3")
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {
        "csv": folder / "density_sweep.csv",
        "markdown": folder / "density_sweep.md",
        "plot": folder / "density_sweep.png",
    }
    table.to_csv(paths["csv"], index=False, float_format="%.17g")
    paths["markdown"].write_text(format_sweep_markdown(table, threshold))
    plot_sweep(table, threshold, paths["plot"], title)
    return paths
