"""Fitted growth of iteration time and memory with batch size and NFE."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

__all__ = ["LineFit", "fit_line", "fit_power_law"]


@dataclass(frozen=True)
class LineFit:
    """Least-squares line y = intercept + slope * x, with r^2 and the slope's standard error.

    For a power law (``log_log``) the line is fitted to log10 y against log10 x, so ``slope``
    is the exponent: 1 means y grows in proportion to x.
    """

    slope: float
    intercept: float
    r_squared: float
    slope_stderr: float
    n: int
    log_log: bool = False

    def as_dict(self) -> dict:
        return asdict(self)


def _clean(value: float) -> float:
    return float(value) if math.isfinite(value) else math.nan


def fit_line(x: list[float], y: list[float]) -> LineFit:
    """Fit y = intercept + slope * x by least squares (scipy.stats.linregress)."""
    xs, ys = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if xs.shape != ys.shape:
        raise ValueError(f"cannot fit {xs.size} x values against {ys.size} y values; pass one y per x")
    if np.unique(xs).size < 2:
        raise ValueError(f"cannot fit a line through x values {sorted(set(xs.tolist()))}: need two distinct x values")
    fit = stats.linregress(xs, ys)
    return LineFit(_clean(fit.slope), _clean(fit.intercept), _clean(fit.rvalue**2), _clean(fit.stderr), xs.size)


def fit_power_law(x: list[float], y: list[float]) -> LineFit:
    """Fit y = c * x^k as a line in log10-log10 space; ``slope`` is the exponent k."""
    xs, ys = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if (xs <= 0).any() or (ys <= 0).any():
        raise ValueError("cannot fit a power law to values <= 0; every x and y must be positive")
    fit = fit_line(np.log10(xs).tolist(), np.log10(ys).tolist())
    return LineFit(fit.slope, fit.intercept, fit.r_squared, fit.slope_stderr, fit.n, log_log=True)
