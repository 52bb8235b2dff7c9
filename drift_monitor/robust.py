"""The robust z-score (median and MAD), the one definition the monitor and the alerts share.

Two places ask "how far out is this value?": the refusal statistics ask it of every SAE
feature's score against all features (:func:`drift_monitor.probe.metrics.robust_z`), and the
``sudden_change`` alert asks it of a metric's newest step-to-step change against the run's
earlier changes (:func:`robust_change_z`). Both must use the same estimator, so it lives here
once: a median and MAD are not thrown off by the few outliers being looked for, where a mean
and standard deviation would be.

Why NumPy and not torch: the alerts, the store and the exporters run in processes without
torch (the dashboard), and this module is imported by :mod:`drift_monitor.alerts`. The
refusal scores are one value per feature, computed once per snapshot and already on the CPU,
so the tensor caller loses nothing by handing them over here.

Imports only the stdlib and NumPy.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["CHANGE_REL_TOL", "MAD_SCALE", "MEAN_AD_SCALE", "median_scale", "robust_change_z", "robust_z",
           "standardize"]

#: MAD -> standard deviation for normal data, so a robust z reads like an ordinary z.
MAD_SCALE = 1.4826
#: Mean absolute deviation -> standard deviation for normal data (sqrt(pi/2)). The fallback
#: scale when the MAD is 0, which is common: most SAE features never move, and a frozen layer's
#: metric changes by exactly 0 at every step.
MEAN_AD_SCALE = 1.2533
#: A change this small relative to the metric's size counts as no change when every earlier
#: change was identical: float noise in a constant metric must not read as an infinite z.
CHANGE_REL_TOL = 1e-12


def median_scale(values: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """``(median, scale)`` of ``values``: scale = 1.4826·MAD, or 1.2533·mean |x − median| when
    the MAD is 0; 0 when every value is the same. The median of an even count is the mean of
    the two middle values. Raises ValueError on no values (there is nothing to compare with)."""
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        raise ValueError("a robust scale needs at least one value")
    med = float(np.median(a))
    dev = np.abs(a - med)
    scale = MAD_SCALE * float(np.median(dev))
    if scale == 0.0:
        scale = MEAN_AD_SCALE * float(dev.mean())
    return med, scale


def standardize(x: float | np.ndarray, med: float, scale: float, tol: float = 0.0) -> np.ndarray:
    """(x − med) / scale. With scale 0 (no spread to measure against) a value further than
    ``tol`` from the median is infinitely surprising (±inf) and any other value is 0."""
    diff = np.asarray(x, dtype=np.float64) - med
    if scale != 0.0:
        return diff / scale
    return np.where(np.abs(diff) > tol, np.copysign(np.inf, diff), 0.0)


def robust_z(values: Sequence[float] | np.ndarray) -> np.ndarray:
    """The robust z of every value against all of them (float64); above the median and with
    zero scale: +inf. The refusal statistics' emerging-feature test."""
    med, scale = median_scale(values)
    return standardize(values, med, scale)


def robust_change_z(deltas: Sequence[float], d: float, scale_ref: float = 0.0) -> tuple[float, float, float]:
    """Robust z of a change ``d`` against earlier changes: ``(z, median, scale)``.

    z = (d − median) / (1.4826·MAD). When MAD is 0 the mean absolute deviation about the median
    ×1.2533 is used; if that is 0 too (every earlier change identical), z is ±inf when ``d``
    differs from the median by more than 1e-12 relative to ``scale_ref`` (the metric's size)
    and the changes' own size, else 0. Same estimator as the refusal z-scores (:func:`robust_z`).
    """
    if np.asarray(deltas).size == 0:
        raise ValueError("robust_change_z needs at least one earlier change")
    med, scale = median_scale(deltas)
    tol = CHANGE_REL_TOL * max(abs(scale_ref), abs(d), abs(med))
    return float(standardize(d, med, scale, tol)), med, scale
