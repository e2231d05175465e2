"""The task layer shared by the benchmarks and meta-training: one data set class
and registry, one task interface, one inner training loop."""

from __future__ import annotations

import hashlib

import pytest
import torch

from benchmarks import data
from benchmarks.data import Dataset
from meta_train.data import load_dataset

# ------------------------------------------------------------------------ data
#: SHA-256 of the bytes of x_train, y_train, x_test, y_test (in that order) of
#: meta-training's data sets, recorded before the task layer was unified, from
#: the old ``meta_train.data.load_dataset(name)`` (its ``x, y, x_val, y_val``).
#: Every validation figure recorded so far was computed on exactly these
#: tensors: a change here makes them incomparable. (The data depend on
#: ``mnist1d`` 0.0.2.post1 and scikit-learn's shipped digits.)
META_DATA_SHA256 = {
    "mnist1d": "e82e98e91c46425deb3a97ee3ef2c954bf5f237d1ad3f7cd5898c4d6ff5eb373",
    "digits": "7bbd1e0968a21d45f43e7079672ed1f3660e67db312b5a9294961688d492340f",
}


def _sha256(dataset: Dataset) -> str:
    digest = hashlib.sha256()
    for t in (dataset.x_train, dataset.y_train, dataset.x_test, dataset.y_test):
        digest.update(t.contiguous().numpy().tobytes())
    return digest.hexdigest()


@pytest.mark.parametrize("name", sorted(META_DATA_SHA256))
def test_meta_training_data_are_the_recorded_tensors(name):
    dataset = load_dataset(name)
    assert isinstance(dataset, Dataset)
    assert dataset.x_train.dtype == torch.float32
    assert dataset.y_train.dtype == torch.int64
    assert dataset.num_classes == 10
    assert _sha256(dataset) == META_DATA_SHA256[name]


def test_one_registry_keeps_both_variants_apart():
    # meta-training's variants are entries of the one registry, not the suite's
    assert load_dataset("mnist1d") is data.load_dataset("meta_mnist1d")
    assert load_dataset("digits") is data.load_dataset("meta_digits")
    assert len(data.mnist1d().x_train) == 4000
    assert len(data.meta_mnist1d().x_train) == 3200
    assert data.digits().x_train.max() <= 1.0 < data.meta_digits().x_train.max()
    with pytest.raises(ValueError, match="Invalid dataset: 'cifar'.*meta_digits"):
        data.load_dataset("cifar")
    with pytest.raises(ValueError, match="Invalid dataset: 'meta_digits'"):
        load_dataset("meta_digits")  # a config names the family's data only
