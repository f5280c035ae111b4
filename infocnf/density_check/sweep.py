"""The tolerance sweep: integrate the model density on a grid at each tolerance and pick the verdict."""

from __future__ import annotations

import copy
import logging
import math
import time
import warnings
from collections.abc import Sequence

import pandas as pd
import torch
from scipy import integrate

from ..solve import SolveError, SolveOptions
from .config import SweepConfig, validate_tolerances
from .model import DensityModel

__all__ = ["SWEEP_COLUMNS", "grid_points", "riemann_log_integral", "quad_integral", "sweep_tolerances",
           "choose_verdict_tolerance"]

log = logging.getLogger(__name__)

# Columns of the sweep table, one row per (tolerance, label). The quad columns are NaN for 2-D data
# and at tolerances outside sweep.quad_tolerances. The label is <NA> for an unconditional model.
SWEEP_COLUMNS = (
    "tolerance",
    "label",
    "integral",  # Riemann sum of p(x | label) over the grid box
    "abs_error",  # |integral - 1|
    "nfe",  # forward NFE of the one grid solve at this tolerance, summed over blocks
    "halved_grid_gap",  # |integral - the same sum on every other grid point|: the grid's own error estimate
    "integral_quad",  # scipy.integrate.quad of the same density, one solve per point (1-D only)
    "quad_gap",  # |integral - integral_quad|
    "quad_error_estimate",  # quad's own absolute error estimate
    "quad_evaluations",  # points quad evaluated, each a solve of its own
    "status",  # "ok" or the SolveError status of the grid solve
    "message",
    "elapsed_s",  # wall-clock seconds of the grid solve
    "quad_elapsed_s",
)


def grid_points(sweep: SweepConfig, dim: int, dtype: torch.dtype = torch.float64,
                device: torch.device | str = "cpu") -> tuple[torch.Tensor, float]:
    """Cell centres of the grid over [low, high]^dim and the log of one cell's volume.

    Returns points of shape (points**dim, dim), with the first axis varying slowest, and
    dim * log(cell width).
    """
    width = sweep.cell_width
    centres = sweep.low + (torch.arange(sweep.points, dtype=dtype, device=device) + 0.5) * width  # (points,)
    axes = torch.meshgrid(*([centres] * dim), indexing="ij")
    grid = torch.stack([a.reshape(-1) for a in axes], dim=1)  # (points**dim, dim)
    return grid, dim * math.log(width)


def riemann_log_integral(log_p: torch.Tensor, log_cell_volume: float) -> float:
    """log of the Riemann sum sum_i p_i * volume, computed as logsumexp(log p) + log volume.

    Working in log space keeps cells where p underflows to zero from losing the sum's precision.
    """
    return float(torch.logsumexp(log_p.reshape(-1), dim=0)) + log_cell_volume


def _halved_grid_log_integral(log_p: torch.Tensor, dim: int, points: int, log_cell_volume: float) -> float:
    # Every other point on each axis forms a grid of twice the width. Both sums converge fast for a
    # smooth density that decays inside the box, so their gap is a conservative estimate of the finer
    # sum's error.
    coarse = log_p.reshape((points,) * dim)[(slice(None, None, 2),) * dim]
    return riemann_log_integral(coarse, log_cell_volume + dim * math.log(2.0))


def quad_integral(model: DensityModel, label: int | None, options: SolveOptions, low: float, high: float,
                  breakpoints: Sequence[float] = (), limit: int = 50, epsabs: float = 1e-6,
                  cache: dict[float, tuple[torch.Tensor, torch.Tensor]] | None = None) -> dict[str, float]:
    """Integrate p(x | label) of a 1-D model over [low, high] with scipy.integrate.quad.

    Each point quad requests is its own solve (a batch of one), so the adaptive step sizes differ
    from those of the batched grid solve. ``cache`` maps x to the flow output (z, delta_log_prob)
    so that the labels of one tolerance share solves. Returns integral, error_estimate,
    evaluations and message (empty when quad reports no problem).
    """
    if model.dim != 1:
        raise ValueError(f"quad integrates 1-D densities only, but the model has {model.dim} features; "
                         "use the grid sum of sweep_tolerances for 2-D data")
    cache = {} if cache is None else cache
    parameter = next(model.parameters())
    labels = None if label is None else torch.tensor([label], device=parameter.device)
    evaluations = 0

    def density(x: float) -> float:
        nonlocal evaluations
        evaluations += 1
        if x not in cache:
            point = torch.tensor([[x]], dtype=parameter.dtype, device=parameter.device)  # (1, 1)
            out = model.encode(point, options)
            cache[x] = (out.z, out.delta_log_prob)
        z, delta_log_prob = cache[x]
        return math.exp(float(model.log_prob_from_latent(z, delta_log_prob, labels)[0]))

    inside = sorted(b for b in breakpoints if low < b < high)
    with torch.no_grad(), warnings.catch_warnings():
        # quad reports its problems through the returned message, which is kept in the table.
        warnings.simplefilter("ignore", integrate.IntegrationWarning)
        result = integrate.quad(density, low, high, points=inside or None, limit=limit, epsabs=epsabs,
                                epsrel=0.0, full_output=1)
    message = result[3] if len(result) > 3 else ""
    return {"integral": result[0], "error_estimate": result[1], "evaluations": evaluations, "message": message}


def _row(tolerance: float, label: int | None, **values) -> dict:
    row = {column: math.nan for column in SWEEP_COLUMNS}
    row.update(tolerance=tolerance, label=pd.NA if label is None else label, status="ok", message="")
    row.update(values)
    return row


@torch.no_grad()
def sweep_tolerances(model: DensityModel, sweep: SweepConfig, quad_breakpoints: Sequence[float] = ()) -> pd.DataFrame:
    """Integrate the model's density at each tolerance of ``sweep`` and return the table.

    The model is copied to float64 so that round-off stays far below the tightest tolerance.
    At each tolerance the whole grid is one batch, solved once with exact divergence; a
    conditional model then gets one row per label from that same solve (the labels change only
    the prior), and an unconditional one a single row with label <NA>. For 1-D data,
    scipy.integrate.quad cross-checks the rows at ``sweep.quad_tolerances``, helped by
    ``quad_breakpoints`` (for example the mixture means). A failed grid solve gives rows with
    its status and NaN values, and the sweep goes on. Columns are ``SWEEP_COLUMNS``.
    """
    tolerances = validate_tolerances(sweep.tolerances)
    model = copy.deepcopy(model).double().eval()
    device = next(model.parameters()).device
    grid, log_cell_volume = grid_points(sweep, model.dim, torch.float64, device)
    labels = list(range(model.num_classes)) if model.conditional else [None]
    rows = []
    for tolerance in tolerances:
        options = SolveOptions(atol=tolerance, rtol=tolerance, method=sweep.method, divergence="exact",
                               max_num_steps=sweep.max_num_steps)
        start = time.monotonic()
        try:
            out = model.encode(grid, options)
        except SolveError as exc:
            log.warning("tolerance %g: the grid solve failed (%s)", tolerance, exc)
            rows += [_row(tolerance, label, status=exc.status, message=exc.message,
                          elapsed_s=time.monotonic() - start) for label in labels]
            continue
        elapsed_s = time.monotonic() - start
        nfe = sum(s.nfe_forward for s in out.stats)
        cache: dict[float, tuple[torch.Tensor, torch.Tensor]] = {}
        for label in labels:
            label_tensor = None if label is None else torch.full((grid.shape[0],), label, device=device)
            log_p = model.log_prob_from_latent(out.z, out.delta_log_prob, label_tensor)  # (points**dim,)
            log_integral = riemann_log_integral(log_p, log_cell_volume)
            integral = math.exp(log_integral)
            coarse = math.exp(_halved_grid_log_integral(log_p, model.dim, sweep.points, log_cell_volume))
            row = _row(tolerance, label, integral=integral, abs_error=abs(math.expm1(log_integral)), nfe=nfe,
                       halved_grid_gap=abs(integral - coarse), elapsed_s=elapsed_s)
            if model.dim == 1 and tolerance in sweep.quad_tolerances:
                quad_start = time.monotonic()
                try:
                    quad = quad_integral(model, label, options, sweep.low, sweep.high, quad_breakpoints,
                                         sweep.quad_limit, max(sweep.quad_epsabs, 10 * tolerance), cache)
                except SolveError as exc:
                    log.warning("tolerance %g: a quad point solve failed (%s); the row keeps its grid sum", tolerance,
                                exc)
                    row.update(message=f"quad: a point solve failed ({exc})")
                else:
                    row.update(integral_quad=quad["integral"], quad_gap=abs(integral - quad["integral"]),
                               quad_error_estimate=quad["error_estimate"], quad_evaluations=quad["evaluations"],
                               message=f"quad: {quad['message']}" if quad["message"] else "")
                row.update(quad_elapsed_s=time.monotonic() - quad_start)
            rows.append(row)
            log.info("tolerance %g%s: integral %.10f, |integral - 1| %.3e, NFE %d, %.1f s", tolerance,
                     "" if label is None else f", label {label}", integral, row["abs_error"], nfe, elapsed_s)
    table = pd.DataFrame(rows, columns=list(SWEEP_COLUMNS))
    table["label"] = table["label"].astype("Int64")
    return table


def choose_verdict_tolerance(table: pd.DataFrame, threshold: float) -> float | None:
    """Return the loosest swept tolerance that, with every tighter one, keeps |integral - 1| < threshold.

    A tolerance passes when every row at it (every label) has status "ok" and abs_error below
    ``threshold``. Requiring every tighter tolerance to pass too keeps a loose tolerance whose
    errors happen to cancel from becoming the verdict. Returns None when the tightest fails.
    """
    if not (isinstance(threshold, (int, float)) and math.isfinite(threshold) and threshold > 0):
        raise ValueError(f"invalid threshold = {threshold!r}: expected a number > 0, for example 1e-3")
    missing = sorted({"tolerance", "abs_error"} - set(table.columns))
    if missing:
        raise ValueError(f"the sweep table lacks the column {missing[0]!r}; pass the table sweep_tolerances returns")
    if table.empty:
        raise ValueError("the sweep table is empty; run sweep_tolerances with at least one tolerance")
    ok = table["status"].eq("ok") if "status" in table.columns else pd.Series(True, index=table.index)
    passed = (ok & (table["abs_error"] < threshold)).groupby(table["tolerance"]).all()
    verdict = None
    for tolerance in sorted(passed.index):  # tightest first
        if not passed[tolerance]:
            break
        verdict = float(tolerance)
    return verdict
