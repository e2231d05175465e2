"""The workloads benchmark: the jobs people train, ranked by held-out metric
and wall-clock (``python -m benchmarks.workloads``; :mod:`.bench` runs it).

:mod:`.spec` says what a workload is, :mod:`.recipes` how each optimizer is
set up, :mod:`.runner` trains and caches one run, :mod:`.report` ranks them.
Each workload is a module of this package exporting ``WORKLOAD``.
"""

from __future__ import annotations

import importlib

from benchmarks.optim.workloads.spec import Workload

__all__ = ["WORKLOAD_NAMES", "get_workloads"]

#: Workload names, in table order; each is the module defining it.
WORKLOAD_NAMES = ("gpt", "resnet", "lstm", "vit", "finetune", "tabular")


def get_workloads(names=None) -> list[Workload]:
    """Workloads by name (all when ``names`` is empty or ``None``).

    Raises:
        ValueError: an unknown name, listing the known ones.
    """
    names = list(names or WORKLOAD_NAMES)
    unknown = [n for n in names if n not in WORKLOAD_NAMES]
    if unknown:
        raise ValueError(
            f"Invalid workload: {', '.join(unknown)} "
            f"(known: {', '.join(WORKLOAD_NAMES)})"
        )
    return [
        importlib.import_module(f"benchmarks.optim.workloads.{n}").WORKLOAD
        for n in names
    ]
