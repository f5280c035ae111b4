"""Report figures: per-cell training curves over epochs and learned tolerance distributions."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from .tracking import open_tracking  # noqa: E402

__all__ = ["plot_curves", "plot_tolerance_distributions", "CURVE_METRICS"]

log = logging.getLogger(__name__)

# (per-epoch MLflow metric, axis label, scale)
CURVE_METRICS = (
    ("test_error", "test error %", 100.0),
    ("test_bits_per_dim", "test bits/dim", 1.0),
    ("train_nfe_forward", "train NFE forward per iteration", 1.0),
)


def _history(client, run_id: str, key: str) -> pd.Series:
    points = client.get_metric_history(run_id, key)
    if not points:
        return pd.Series(dtype=float)
    frame = pd.DataFrame([(p.step, p.timestamp, p.value) for p in points], columns=["step", "ts", "value"])
    # A resumed run may log an epoch twice; keep the latest value of each step.
    frame = frame.sort_values(["step", "ts"]).drop_duplicates("step", keep="last")
    return frame.set_index("step")["value"]


def plot_curves(experiment: str, runs: pd.DataFrame, out: Path, tracking_uri: str | None) -> list[tuple[str, Path]]:
    """Plot one panel per metric and one line per cell: the mean over finished seeds with a +-1 std band."""
    client, _, _ = open_tracking(tracking_uri, experiment, create=False)
    done = runs[runs["status"] == "finished"]
    if done.empty:
        return []
    fig, axes = plt.subplots(1, len(CURVE_METRICS), figsize=(6 * len(CURVE_METRICS), 4.5))
    for ax, (key, label, scale) in zip(axes, CURVE_METRICS):
        for cell_id, group in done.groupby("cell_id", sort=False):
            series = [_history(client, run_id, key) * scale for run_id in group["run_id"]]
            series = [s for s in series if not s.empty]
            if not series:
                continue
            frame = pd.concat(series, axis=1)
            mean, std = frame.mean(axis=1), frame.std(axis=1, ddof=1).fillna(0.0)
            # Markers keep a run of one epoch visible: a line through a single point draws nothing.
            (line,) = ax.plot(mean.index, mean.values, marker="o", markersize=3, label=f"{cell_id} (n={frame.shape[1]})")
            ax.fill_between(mean.index, (mean - std).values, (mean + std).values, color=line.get_color(), alpha=0.2)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    # Unconditional cells have no test error, so the legend goes on the panel with the most lines.
    max(axes, key=lambda a: len(a.get_lines())).legend(fontsize=7)
    fig.suptitle(f"{experiment}: mean over seeds, band = ±1 std")
    fig.tight_layout()
    path = out / "curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [("Training curves per cell", path)]


def plot_tolerance_distributions(
    experiment: str, runs: pd.DataFrame, out: Path, tracking_uri: str | None
) -> list[tuple[str, Path]]:
    """Per block, the learned log10 tolerance sampled by the gates on train and test data.

    Writes one figure per learned cell, in the order the cells first appear in ``runs``. All
    figures share one log10 tolerance range on the y-axis, so cells can be compared by eye.
    """
    client, _, _ = open_tracking(tracking_uri, experiment, create=False)
    learned = runs[(runs["status"] == "finished") & (runs["tolerance"] == "learned")]
    cells = []
    for cell_id, group in learned.groupby("cell_id", sort=False):
        frames = _download_tolerances(client, group["run_id"])
        if frames:
            cells.append((cell_id, pd.concat(frames), len(frames)))
    if not cells:
        return []
    values = pd.concat([data["log10_tolerance"] for _, data, _ in cells])
    low, high = float(values.min()), float(values.max())
    # 5 % headroom above and below; a single sampled value gets half a decade either side.
    pad = 0.05 * (high - low) if high > low else 0.5
    ylim = (low - pad, high + pad)
    figures = []
    for cell_id, data, seeds in cells:
        path = out / f"tolerances_{_safe(cell_id)}.png"
        _plot_tolerance_violins(data, f"learned tolerances, {seeds} seeds\n{cell_id.replace(',', ', ')}", ylim, path)
        figures.append((f"Learned tolerance distribution: {cell_id}", path))
    return figures


def _download_tolerances(client, run_ids: pd.Series) -> list[pd.DataFrame]:
    frames = []
    for run_id in run_ids:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                local = client.download_artifacts(run_id, "tolerances.csv", tmp)
            except Exception as exc:  # A run without the artifact is skipped with a log line.
                log.warning("run %s has no tolerances.csv (%s); left out of the distribution plot", run_id, exc)
                continue
            frames.append(pd.read_csv(local))
    return frames


def _plot_tolerance_violins(data: pd.DataFrame, title: str, ylim: tuple[float, float], path: Path) -> None:
    blocks = sorted(data["block"].unique())
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(blocks) + 2), 4))
    positions, values, colors = [], [], []
    for i, block in enumerate(blocks):
        for j, (split, color) in enumerate((("train", "tab:blue"), ("test", "tab:orange"))):
            v = data[(data["block"] == block) & (data["split"] == split)]["log10_tolerance"].to_numpy()
            if v.size:
                positions.append(i * 3 + j)
                values.append(v)
                colors.append(color)
    parts = ax.violinplot(values, positions=positions, showmedians=True)
    for body, color in zip(parts["bodies"], colors):
        body.set_facecolor(color)
    ax.set_xticks([i * 3 + 0.5 for i in range(len(blocks))], [f"block {b}" for b in blocks])
    ax.set_ylim(*ylim)
    ax.set_ylabel("log10 tolerance sampled by the gate")
    ax.plot([], [], color="tab:blue", label="train")
    ax.plot([], [], color="tab:orange", label="test")
    ax.legend()
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


