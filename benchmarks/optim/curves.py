"""Loss-curve arithmetic: smoothing, final loss, steps-to-target and speedup.

Conventions used by every benchmark:

* the **smoothed** curve is a trailing moving average whose window is a fixed
  fraction (default 5%) of the run length, so minibatch noise does not decide
  comparisons;
* the **final loss** of a run is the last value of its smoothed curve, i.e.
  the mean train loss over the last 5% of steps;
* steps are counted from 1: step ``t`` is the loss of the ``t``-th minibatch,
  measured before the ``t``-th update.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

__all__ = [
    "SMOOTHING_FRACTION",
    "SPEEDUP_RTOL",
    "smoothing_window",
    "smooth",
    "final_loss",
    "steps_to_reach",
    "mean_curve",
    "Speedup",
    "speedup",
    "subsample",
    "mean_std",
]

#: Fraction of a run's steps averaged by the smoothing window.
SMOOTHING_FRACTION = 0.05
#: A curve "reaches" a target loss when within this relative tolerance of it.
SPEEDUP_RTOL = 1e-3


def smoothing_window(steps: int, fraction: float = SMOOTHING_FRACTION) -> int:
    """Window (in steps) of the trailing average for a run of ``steps`` steps."""
    return max(1, round(steps * fraction))


def smooth(losses: Sequence[float] | np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average; the first ``window - 1`` values average what exists.

    Args:
        losses: per-step losses.
        window: number of steps averaged.

    Returns:
        Array of the same length as ``losses``.
    """
    x = np.asarray(losses, dtype=np.float64)
    if x.size == 0:
        return x
    cumsum = np.concatenate([[0.0], np.cumsum(x)])
    ends = np.arange(1, x.size + 1)
    starts = np.maximum(ends - window, 0)
    return (cumsum[ends] - cumsum[starts]) / (ends - starts)


def final_loss(losses: Sequence[float] | np.ndarray, window: int) -> float:
    """Mean of the last ``window`` losses (``nan`` for an empty run)."""
    x = np.asarray(losses, dtype=np.float64)
    return float(x[-window:].mean()) if x.size else math.nan


def steps_to_reach(curve: np.ndarray, target: float) -> int | None:
    """First step (1-based) at which ``curve <= target``, or ``None`` if never."""
    hits = np.flatnonzero(np.asarray(curve) <= target)
    return int(hits[0]) + 1 if hits.size else None


def mean_curve(curves: Sequence[Sequence[float]]) -> np.ndarray | None:
    """Pointwise mean of curves over their common length (``None`` if no curve)."""
    curves = [np.asarray(c, dtype=np.float64) for c in curves if len(c)]
    if not curves:
        return None
    length = min(len(c) for c in curves)
    return np.mean([c[:length] for c in curves], axis=0)


@dataclass(frozen=True)
class Speedup:
    """How much sooner the learned optimizer reaches its own final loss.

    Attributes:
        value: ``baseline_steps / ng_steps``; when the baseline never reaches
            the target, ``total_steps / ng_steps`` (a lower bound).
        censored: ``True`` when the baseline never reached the target, so
            ``value`` is a lower bound (printed as ``>=``).
        target: the learned optimizer's final smoothed loss.
        ng_steps: first step at which the learned optimizer's smoothed curve
            reaches ``target``.
        baseline_steps: the same for the baseline (``None`` if never).
        to_baseline_final: the other direction, informative when ``value`` is
            censored: the baseline's steps divided by the steps the learned
            optimizer needs to reach the *baseline's* final smoothed loss
            (``None`` if it never does or the baseline did not finish).
    """

    value: float
    censored: bool
    target: float
    ng_steps: int
    baseline_steps: int | None
    to_baseline_final: float | None = None

    def as_dict(self) -> dict:
        """Plain-dict form for JSON."""
        return asdict(self)


def speedup(
    ng_curve: np.ndarray,
    baseline_curve: np.ndarray,
    total_steps: int,
    rtol: float = SPEEDUP_RTOL,
) -> Speedup:
    """Speedup of the learned optimizer over a baseline, from smoothed curves.

    The target is the learned optimizer's final smoothed loss. Both runs are
    timed by the first step their smoothed curve comes within ``rtol`` of it
    (``curve <= target * (1 + rtol)``), so the measure is symmetric, noise in
    the last steps does not favour either side, and two curves equal up to
    floating-point rounding give exactly 1.

    Args:
        ng_curve: smoothed (seed-mean) curve of the learned optimizer.
        baseline_curve: smoothed (seed-mean) curve of the baseline; may be
            shorter than ``total_steps`` if the baseline diverged.
        total_steps: the step budget (the cap used when the baseline never
            reaches the target).
        rtol: relative tolerance of "reaching" the target.
    """
    target = float(ng_curve[-1])
    threshold = target + abs(target) * rtol
    ng_steps = steps_to_reach(ng_curve, threshold)
    assert ng_steps is not None  # the last point always reaches itself
    base_steps = steps_to_reach(baseline_curve, threshold)
    reverse = None
    if len(baseline_curve) == total_steps:
        base_final = float(baseline_curve[-1])
        hit = steps_to_reach(ng_curve, base_final + abs(base_final) * rtol)
        reverse = total_steps / hit if hit is not None else None
    if base_steps is None:
        return Speedup(total_steps / ng_steps, True, target, ng_steps, None, reverse)
    return Speedup(base_steps / ng_steps, False, target, ng_steps, base_steps, reverse)


def subsample(
    losses: Sequence[float] | np.ndarray, points: int = 200
) -> tuple[list[int], list[float]]:
    """Compress a curve to at most ``points`` bin means.

    Returns:
        ``(steps, values)``: the last step of each bin and the mean loss in it.
    """
    x = np.asarray(losses, dtype=np.float64)
    if x.size == 0:
        return [], []
    edges = np.unique(np.linspace(0, x.size, min(points, x.size) + 1).astype(int))
    # 6 significant digits: plenty for plots, and keeps result files small.
    values = [float(f"{x[a:b].mean():.6g}") for a, b in zip(edges[:-1], edges[1:])]
    return [int(b) for b in edges[1:]], values


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and (population) standard deviation of the finite values.

    Returns ``(nan, nan)`` when no value is finite.
    """
    x = np.asarray([v for v in values if v is not None], dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return math.nan, math.nan
    return float(x.mean()), float(x.std())
