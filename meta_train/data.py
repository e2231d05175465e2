"""Embedded datasets for meta-training (no downloads): generated or shipped in
packages, cached in memory per process."""

from __future__ import annotations

from functools import cache

import numpy as np
import torch

__all__ = ["Dataset", "load_dataset", "DATASETS"]


class Dataset:
    """Standardised features and labels, split into train and held-out parts."""

    def __init__(self, x, y, x_val, y_val, num_classes: int):
        self.x, self.y = x, y
        self.x_val, self.y_val = x_val, y_val
        self.num_classes = num_classes

    @property
    def num_features(self) -> int:
        return self.x.shape[1]


def _standardise(x: np.ndarray, x_val: np.ndarray):
    mean, std = x.mean(0), x.std(0) + 1e-6
    return (x - mean) / std, (x_val - mean) / std


def _to_dataset(x, y, x_val, y_val) -> Dataset:
    x, x_val = _standardise(x.astype(np.float32), x_val.astype(np.float32))
    return Dataset(
        torch.from_numpy(x).float(),
        torch.from_numpy(np.asarray(y)).long(),
        torch.from_numpy(x_val).float(),
        torch.from_numpy(np.asarray(y_val)).long(),
        int(np.max(y)) + 1,
    )


@cache
def _mnist1d() -> Dataset:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = 4000
    data = make_dataset(args)  # procedural: no download
    return _to_dataset(data["x"], data["y"], data["x_test"], data["y_test"])


@cache
def _digits() -> Dataset:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    perm = np.random.default_rng(0).permutation(len(x))
    x, y = x[perm], y[perm]
    cut = int(0.8 * len(x))
    return _to_dataset(x[:cut], y[:cut], x[cut:], y[cut:])


DATASETS = {"mnist1d": _mnist1d, "digits": _digits}


def load_dataset(name: str) -> Dataset:
    """One of :data:`DATASETS` by name."""
    if name not in DATASETS:
        raise ValueError(
            f"Invalid dataset: {name!r} (expected one of {sorted(DATASETS)})"
        )
    return DATASETS[name]()
