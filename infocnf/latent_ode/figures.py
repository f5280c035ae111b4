"""Trajectory arrays of a trained LatentODE and the figure that compares models on a few test spirals."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..solve import SolveOptions
from .model import LatentODE
from .spirals import CLOCKWISE, SpiralSet

__all__ = ["TrajectorySet", "predict_trajectories", "save_trajectories", "load_trajectories", "plot_trajectories"]


@dataclass
class TrajectorySet:
    """Ground truth, observations and model predictions for a few spirals, as NumPy arrays.

    ``truth`` (spirals, grid_points, 2) is the noise-free trajectory. ``observed`` and ``fit``
    (spirals, window_points, 2) are the noisy window and its reconstruction from the posterior
    mean of z0. ``forward`` and ``backward`` (spirals, extrapolate_points, 2) are the
    extrapolations after and before the window, and ``backward`` runs back in time from the
    window start. ``window_start`` and ``labels`` are (spirals,).
    """

    truth: np.ndarray
    observed: np.ndarray
    fit: np.ndarray
    forward: np.ndarray
    backward: np.ndarray
    window_start: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@torch.no_grad()
def predict_trajectories(model: LatentODE, spirals: SpiralSet, options: SolveOptions, extrapolate_points: int) -> TrajectorySet:
    """Decode every spiral's window and its extrapolations from the posterior mean of z0."""
    model.eval()
    window = spirals.window_points
    mean, _ = model.encode(spirals.observed, spirals.relative_times(window))
    ahead, _ = model.decode_path(mean, spirals.relative_times(window + extrapolate_points), options)
    behind, _ = model.decode_path(mean, spirals.relative_times(extrapolate_points + 1, backward=True), options)
    as_numpy = lambda t: t.detach().cpu().numpy()  # noqa: E731
    return TrajectorySet(
        truth=as_numpy(spirals.truth),
        observed=as_numpy(spirals.observed),
        fit=as_numpy(ahead[:, :window]),
        forward=as_numpy(ahead[:, window:]),
        backward=as_numpy(behind[:, 1:]),
        window_start=as_numpy(spirals.window_start),
        labels=as_numpy(spirals.labels),
    )


def save_trajectories(trajectories: TrajectorySet, path: str | Path) -> None:
    """Write the arrays to a compressed .npz file."""
    np.savez_compressed(path, **dataclasses.asdict(trajectories))


def load_trajectories(path: str | Path) -> TrajectorySet:
    """Read a TrajectorySet from an .npz file or from a run folder that contains trajectories.npz."""
    path = Path(path)
    if path.is_dir():
        path = path / "trajectories.npz"
    if not path.is_file():
        raise ValueError(
            f"trajectory file not found: {path}; pass a finished latent-ode run folder with train.trajectory_spirals > 0"
        )
    with np.load(path) as arrays:
        names = [f.name for f in dataclasses.fields(TrajectorySet)]
        missing = [name for name in names if name not in arrays]
        if missing:
            raise ValueError(f"invalid trajectory file {path}: arrays {', '.join(missing)} are missing")
        return TrajectorySet(**{name: arrays[name] for name in names})


def plot_trajectories(
    models: dict[str, TrajectorySet | str | Path], path: str | Path, num_spirals: int = 4
) -> Path:
    """Draw ``num_spirals`` test spirals (rows) for each model (columns) and save the figure.

    ``models`` maps a column title to a TrajectorySet, an .npz file or a run folder. Every model
    must cover the same spirals. Each panel shows the noise-free trajectory, the observed points,
    the fit on the window and the forward and backward extrapolations. Returns ``path``.
    """
    # A bare Figure renders through the Agg canvas and leaves pyplot's global backend untouched.
    from matplotlib.figure import Figure

    if not models:
        raise ValueError("no models to plot: pass at least one name -> TrajectorySet, .npz file or run folder")
    sets = {name: source if isinstance(source, TrajectorySet) else load_trajectories(source) for name, source in models.items()}
    first_name, first = next(iter(sets.items()))
    for name, trajectories in sets.items():
        if len(trajectories) != len(first) or not np.array_equal(trajectories.window_start, first.window_start):
            raise ValueError(
                f"models {first_name!r} and {name!r} cover different spirals; save both from runs with the same data config"
            )
    rows = min(num_spirals, len(first))
    if rows < 1:
        raise ValueError(f"invalid num_spirals = {num_spirals}: expected >= 1, and the trajectory sets must not be empty")

    columns = len(sets)
    figure = Figure(figsize=(3.2 * columns, 3.2 * rows))
    axes = figure.subplots(rows, columns, squeeze=False)
    for column, (name, trajectories) in enumerate(sets.items()):
        for row in range(rows):
            ax = axes[row, column]
            start, window = int(trajectories.window_start[row]), trajectories.observed.shape[1]
            extra = trajectories.forward.shape[1]
            # Ground truth over the window and both extrapolation ranges.
            truth = trajectories.truth[row, start - extra : start + window + extra]
            ax.plot(truth[:, 0], truth[:, 1], color="0.6", lw=1.0, label="ground truth")
            ax.scatter(trajectories.observed[row, :, 0], trajectories.observed[row, :, 1], s=3, color="0.2",
                       alpha=0.5, label="observed")
            ax.plot(trajectories.fit[row, :, 0], trajectories.fit[row, :, 1], color="tab:blue", lw=1.5, label="fit")
            ax.plot(trajectories.forward[row, :, 0], trajectories.forward[row, :, 1], color="tab:red", lw=1.5,
                    ls="--", label="extrapolation forward")
            ax.plot(trajectories.backward[row, :, 0], trajectories.backward[row, :, 1], color="tab:orange", lw=1.5,
                    ls="--", label="extrapolation backward")
            ax.set_aspect("equal", adjustable="datalim")
            ax.set_xticks([])
            ax.set_yticks([])
            direction = "clockwise" if int(trajectories.labels[row]) == CLOCKWISE else "counter-clockwise"
            ax.set_title(f"{name}: {direction}" if row == 0 else direction, fontsize=9)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    figure.tight_layout(rect=(0, 0.04, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return path
