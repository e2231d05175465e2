"""The meta-training family's data sets, by the names a
:class:`~meta_train.tasks.TaskConfig` uses.

The data sets themselves, and the :class:`Dataset` class, are
:mod:`benchmarks.data`'s (one registry for the benchmarks and meta-training).
A config's ``"mnist1d"`` and ``"digits"`` are recorded in checkpoints and rule
provenance; they name that registry's ``"meta_mnist1d"`` and ``"meta_digits"``,
the family's own variants (not the suite's ``"mnist1d"`` and ``"digits"``).
"""

from __future__ import annotations

from benchmarks import data
from benchmarks.data import Dataset

__all__ = ["Dataset", "load_dataset", "DATASETS"]

#: Data set names of :class:`~meta_train.tasks.TaskConfig` -> names in
#: :data:`benchmarks.data.DATASETS`.
DATASETS: dict[str, str] = {"mnist1d": "meta_mnist1d", "digits": "meta_digits"}


def load_dataset(name: str) -> Dataset:
    """The family's data set ``name`` (a key of :data:`DATASETS`).

    Raises:
        ValueError: for a name the family does not know, listing the known ones.
    """
    if name not in DATASETS:
        raise ValueError(
            f"Invalid dataset: {name!r} (expected one of {sorted(DATASETS)})"
        )
    return data.load_dataset(DATASETS[name])
