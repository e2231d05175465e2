"""Embedded data sets of the benchmarks and of meta-training, generated or
loaded without downloads.

Every loader returns a :class:`Dataset` of float32 / int64 tensors with a fixed
train / held-out split (the split is seeded and does not depend on the run
seed, so every optimizer and every seed sees the same held-out data). Results
are cached in memory only, for the life of the process. :data:`DATASETS` names
every loader; :func:`load_dataset` looks one up.

The meta-training family trains on its own variants of ``mnist1d`` and digits
(:func:`meta_mnist1d`, :func:`meta_digits`): other sizes, splits and
standardisation than the suite's :func:`mnist1d` and :func:`digits`. They are
separate entries, not merged with the suite's, so that every recorded
meta-training and validation figure stays comparable.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "Dataset",
    "DATASETS",
    "load_dataset",
    "digits",
    "wine",
    "breast_cancer",
    "mnist1d",
    "reversal_sequences",
    "meta_mnist1d",
    "meta_digits",
    "standardise",
]

#: Seed of every train / held-out split (independent of the run seeds).
SPLIT_SEED = 1234
#: Fraction of the scikit-learn toy sets held out.
HELD_OUT_FRACTION = 0.2


@dataclass(frozen=True)
class Dataset:
    """A train / held-out split of one data set.

    Attributes:
        x_train: ``(N, ...)`` float32 inputs (int64 tokens for sequences).
        y_train: ``(N, ...)`` int64 class labels (or float32 targets).
        x_test: held-out inputs.
        y_test: held-out labels or targets.
        num_classes: number of classes (0 for regression targets).
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    @property
    def num_features(self) -> int:
        """Size of one flattened input."""
        return int(self.x_train[0].numel())


def _split(x: np.ndarray, y: np.ndarray, num_classes: int) -> Dataset:
    """Seeded stratified split of a scikit-learn toy set."""
    from sklearn.model_selection import train_test_split

    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=HELD_OUT_FRACTION, random_state=SPLIT_SEED, stratify=y
    )
    return Dataset(
        torch.as_tensor(x_tr, dtype=torch.float32),
        torch.as_tensor(y_tr, dtype=torch.long),
        torch.as_tensor(x_te, dtype=torch.float32),
        torch.as_tensor(y_te, dtype=torch.long),
        num_classes,
    )


def standardise(data: Dataset) -> Dataset:
    """Zero mean, unit variance per feature, with statistics of the train split."""
    mean = data.x_train.mean(0, keepdim=True)
    std = data.x_train.std(0, keepdim=True).clamp_min(1e-6)
    return Dataset(
        (data.x_train - mean) / std,
        data.y_train,
        (data.x_test - mean) / std,
        data.y_test,
        data.num_classes,
    )


@functools.cache
def digits() -> Dataset:
    """scikit-learn's 8x8 digits (1797 images), pixels scaled to ``[0, 1]``.

    Inputs are flat ``(64,)`` vectors; reshape to ``(1, 8, 8)`` for a CNN.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return _split(bunch.data / 16.0, bunch.target, 10)


@functools.cache
def wine() -> Dataset:
    """scikit-learn's wine recognition set (178 samples, 13 raw features).

    Features are left in their original units (proline is ~1e3, hue ~1), so
    this is also the badly-scaled-inputs task; :func:`standardise` it otherwise.
    """
    from sklearn.datasets import load_wine

    bunch = load_wine()
    return _split(bunch.data, bunch.target, 3)


@functools.cache
def breast_cancer() -> Dataset:
    """scikit-learn's breast cancer Wisconsin set (569 samples, 30 raw features)."""
    from sklearn.datasets import load_breast_cancer

    bunch = load_breast_cancer()
    return _split(bunch.data, bunch.target, 2)


@functools.cache
def mnist1d() -> Dataset:
    """``mnist1d`` generated procedurally (4000 train / 1000 held-out, length 40).

    ``make_dataset`` synthesises the signals from fixed templates with the
    package's default arguments (seeded); it does not download anything.
    """
    from mnist1d.data import get_dataset_args, make_dataset

    raw = make_dataset(get_dataset_args())
    return Dataset(
        torch.as_tensor(raw["x"], dtype=torch.float32),
        torch.as_tensor(raw["y"], dtype=torch.long),
        torch.as_tensor(raw["x_test"], dtype=torch.float32),
        torch.as_tensor(raw["y_test"], dtype=torch.long),
        10,
    )


@functools.cache
def reversal_sequences(
    vocab: int = 16, length: int = 8, train: int = 4096, test: int = 1024
) -> Dataset:
    """Synthetic token sequences whose target is the sequence reversed.

    Solving it needs attention from each position to its mirror position, so
    a position-aware model must route information across the sequence.

    Args:
        vocab: number of token types.
        length: tokens per sequence.
        train: number of training sequences.
        test: number of held-out sequences.
    """
    gen = torch.Generator().manual_seed(SPLIT_SEED)
    tokens = torch.randint(0, vocab, (train + test, length), generator=gen)
    target = tokens.flip(1)
    return Dataset(
        tokens[:train], target[:train], tokens[train:], target[train:], vocab
    )


# ------------------------------------------------------ meta-training's variants
def _standardised_split(x, y, x_test, y_test) -> Dataset:
    """Features standardised in float32 numpy with the train split's mean and
    population standard deviation (plus 1e-6), as meta-training always has;
    the class count is the largest train label plus one."""
    x, x_test = x.astype(np.float32), x_test.astype(np.float32)
    mean, std = x.mean(0), x.std(0) + 1e-6
    x, x_test = (x - mean) / std, (x_test - mean) / std
    return Dataset(
        torch.from_numpy(x).float(),
        torch.from_numpy(np.asarray(y)).long(),
        torch.from_numpy(x_test).float(),
        torch.from_numpy(np.asarray(y_test)).long(),
        int(np.max(y)) + 1,
    )


@functools.cache
def meta_mnist1d() -> Dataset:
    """The meta-training family's ``mnist1d``: 4000 signals (3200 train / 800
    held-out, length 40), standardised (see :func:`_standardised_split`).

    Not :func:`mnist1d` (5000 signals, raw): ``make_dataset`` with another
    ``num_samples`` draws other signals.
    """
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = 4000
    raw = make_dataset(args)  # procedural: no download
    return _standardised_split(raw["x"], raw["y"], raw["x_test"], raw["y_test"])


@functools.cache
def meta_digits() -> Dataset:
    """The meta-training family's digits: raw pixels (0..16) standardised (see
    :func:`_standardised_split`), split 80 / 20 by a permutation seeded 0
    (1437 train / 360 held-out).

    Not :func:`digits` (pixels scaled to ``[0, 1]``, a stratified split).
    """
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    perm = np.random.default_rng(0).permutation(len(x))
    x, y = x[perm], y[perm]
    cut = int(0.8 * len(x))
    return _standardised_split(x[:cut], y[:cut], x[cut:], y[cut:])


#: Every data set by name: the suite's, then meta-training's variants.
DATASETS: dict[str, Callable[[], Dataset]] = {
    "digits": digits,
    "wine": wine,
    "breast_cancer": breast_cancer,
    "mnist1d": mnist1d,
    "reversal_sequences": reversal_sequences,
    "meta_mnist1d": meta_mnist1d,
    "meta_digits": meta_digits,
}


def load_dataset(name: str) -> Dataset:
    """The data set :data:`DATASETS` names ``name`` (loaded once per process).

    Raises:
        ValueError: for an unknown name, listing the known ones.
    """
    if name not in DATASETS:
        raise ValueError(
            f"Invalid dataset: {name!r} (expected one of {sorted(DATASETS)})"
        )
    return DATASETS[name]()
