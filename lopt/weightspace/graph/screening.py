"""Networks with NaN or infinite weights, caught where they enter the library.

One such network in a training split makes every prediction of its batches NaN
and leaves a fit nothing to select on; an infinite weight gives each model a
different, silently wrong input. So every way in (``NeuralGraphDataset``,
``WeightSpaceData.from_modules``, ``load_zoo``) screens the floating-point
entries of each network's state_dict and, by its ``on_bad`` policy, either
raises a :class:`ValueError` that names the network, or leaves it out, warns,
and records it in a ``skipped`` attribute. The caller's modules and tensors
are never modified.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

__all__ = ["ON_BAD", "SkippedNetwork", "check_on_bad", "nonfinite_report", "screen"]

#: What to do with a network whose weights are not all finite.
ON_BAD = ("raise", "skip")


@dataclass(frozen=True)
class SkippedNetwork:
    """A network left out by ``on_bad="skip"``.

    Attributes:
        index: its position in what the caller passed (or in the zoo).
        name: what messages call it (``"network 3"``, a file stem...).
        reason: which tensors hold which non-finite values.
    """

    index: int
    name: str
    reason: str


def check_on_bad(on_bad: str) -> None:
    """Raise ``ValueError`` unless ``on_bad`` is one of :data:`ON_BAD`."""
    if on_bad not in ON_BAD:
        raise ValueError(f"Invalid on_bad: {on_bad!r} (expected one of {ON_BAD})")


def nonfinite_report(state: Mapping[str, torch.Tensor]) -> str | None:
    """``None`` when every floating-point entry of ``state`` is finite, else
    which entries are not, e.g. ``"0.weight (3 NaN), 2.bias (1 inf)"``."""
    parts = []
    for key, value in state.items():
        if not value.is_floating_point() or bool(torch.isfinite(value).all()):
            continue
        nan = int(torch.isnan(value).sum())
        inf = int(torch.isinf(value).sum())
        counts = [f"{n} {kind}" for n, kind in ((nan, "NaN"), (inf, "inf")) if n]
        parts.append(f"{key} ({', '.join(counts)})")
    return ", ".join(parts) or None


def screen(
    reports: Sequence[str | None],
    names: Sequence[str],
    on_bad: str,
    where: str,
) -> tuple[list[int], list[SkippedNetwork]]:
    """Apply the ``on_bad`` policy to one report per network
    (:func:`nonfinite_report`).

    Args:
        reports: ``None`` for a finite network, else what is wrong with it.
        names: what messages call each network.
        on_bad: ``"raise"`` or ``"skip"``.
        where: the entry point, for messages (``"NeuralGraphDataset"``...).

    Returns:
        The indices kept and the networks skipped.

    Raises:
        ValueError: ``on_bad="raise"`` and a network is not finite (the first
            one is named, with a count of the others), or every network is
            bad.
    """
    check_on_bad(on_bad)
    bad = [i for i, report in enumerate(reports) if report is not None]
    if not bad:
        return list(range(len(reports))), []
    if on_bad == "raise":
        first = bad[0]
        others = f" (and {len(bad) - 1} more networks)" if len(bad) > 1 else ""
        raise ValueError(
            f"Invalid weights: {names[first]} has non-finite values in "
            f"{reports[first]}{others}; fix or drop it, or pass on_bad='skip' "
            f"to {where} to leave such networks out"
        )
    skipped = [SkippedNetwork(i, names[i], reports[i]) for i in bad]
    if len(skipped) == len(reports):
        raise ValueError(
            f"Invalid weights: every one of the {len(reports)} networks has "
            f"non-finite values (first: {names[0]}, {reports[0]})"
        )
    listed = "; ".join(f"{s.name}: {s.reason}" for s in skipped[:5])
    more = f"; and {len(skipped) - 5} more" if len(skipped) > 5 else ""
    warnings.warn(
        f"{where} skipped {len(skipped)} of {len(reports)} networks with "
        f"non-finite weights ({listed}{more}); see its .skipped",
        stacklevel=3,
    )
    bad_set = set(bad)
    return [i for i in range(len(reports)) if i not in bad_set], skipped
