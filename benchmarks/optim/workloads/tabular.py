"""A tabular MLP where overfitting decides: dropout, weight decay, a small
noisy training set.

Data: scikit-learn's ``make_classification`` (generated, nothing downloaded):
40 features of which 12 informative, 10% of the labels flipped, 2,000
training and 4,000 held-out rows, features standardised on the training
rows. The MLP (40-512-512-2, ReLU, dropout 0.3, 0.29M parameters) can
memorise the training rows; the held-out accuracy is what its users read.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from benchmarks.optim.workloads.images import classifier_job
from benchmarks.optim.workloads.spec import Job, hidden_matrices, split_decay, workload

__all__ = ["WORKLOAD"]

TRAIN, HELD_OUT, FEATURES = 2000, 4000, 40
BATCH = 128


@functools.lru_cache(maxsize=1)
def _data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import make_classification

    # 12 informative features, 8 linear mixtures of them, the rest noise; 4
    # clusters per class; 10% of the labels flipped.
    shape = {"n_informative": 12, "n_redundant": 8, "n_clusters_per_class": 4}
    n = TRAIN + HELD_OUT
    x, y = make_classification(n, FEATURES, **shape, flip_y=0.1, random_state=2026)
    x = torch.tensor(x, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.long)
    mean, std = x[:TRAIN].mean(0), x[:TRAIN].std(0)
    x = (x - mean) / std
    return x[:TRAIN], y[:TRAIN], x[TRAIN:], y[TRAIN:]


def dropout_mlp(inputs: int, width: int, classes: int, dropout: float) -> nn.Sequential:
    """``inputs-width-width-classes``, ReLU and dropout after each hidden layer."""
    return nn.Sequential(
        nn.Linear(inputs, width),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(width, width),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(width, classes),
    )


def rows_job(
    model: nn.Module,
    data: tuple[torch.Tensor, ...],
    batch: int,
    generator: torch.Generator,
    exclude: list[nn.Module],
    noise: float = 0.0,
) -> Job:
    """The classifier :class:`Job` of ``model`` on rows ``data = (x, y,
    x_val, y_val)``: batches of ``batch`` rows drawn with replacement by
    ``generator`` (plus Gaussian ``noise`` on the inputs, if any), the usual
    decay groups, and Muon's hidden matrices outside ``exclude``."""
    x, y, x_val, y_val = data

    def next_batch():
        idx = torch.randint(0, len(x), (batch,), generator=generator)
        if not noise:
            return x[idx], y[idx]
        return x[idx] + noise * torch.randn(x[idx].shape, generator=generator), y[idx]

    return classifier_job(
        model,
        next_batch,
        x_val,
        y_val,
        split_decay(model),
        hidden_matrices(model, exclude=exclude),
    )


def _make(seed: int, quick: bool) -> Job:
    torch.manual_seed(seed)
    model = dropout_mlp(FEATURES, 128 if quick else 512, 2, 0.3)
    gen = torch.Generator().manual_seed(10_000 + seed)
    return rows_job(model, _data(), BATCH, gen, exclude=[model[0], model[-1]])


WORKLOAD = workload("tabular", "MLP 40-512-512-2, dropout 0.3, 2k noisy rows", _make)
