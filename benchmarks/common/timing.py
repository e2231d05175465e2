"""Wall-clock timing of small callables, measured side by side.

Two optimizers compared in one process share the machine's noise (other jobs,
frequency scaling, cache state). :func:`interleaved_times` alternates their
calls, repeat after repeat, after a warm-up, and reports medians, so a burst of
background load hits both sides instead of biasing one.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping

__all__ = ["time_call", "interleaved_times"]


def time_call(fn: Callable[[], object]) -> float:
    """Seconds taken by one call of ``fn`` (``time.perf_counter``)."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved_times(
    fns: Mapping[str, Callable[[], object]], repeats: int, warmup: int = 2
) -> dict[str, dict[str, float]]:
    """Median, minimum and maximum milliseconds per call of each function.

    Every repeat calls each function once, in the given order, so the
    functions are measured under the same conditions.

    Args:
        fns: named functions to time.
        repeats: measured calls per function.
        warmup: unmeasured calls per function first (lazy state, caches).

    Returns:
        ``{name: {"median_ms", "min_ms", "max_ms", "repeats"}}``.
    """
    if repeats < 1:
        raise ValueError(f"Invalid repeats: {repeats}")
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            samples[name].append(1e3 * time_call(fn))
    return {
        name: {
            "median_ms": statistics.median(values),
            "min_ms": min(values),
            "max_ms": max(values),
            "repeats": len(values),
        }
        for name, values in samples.items()
    }
