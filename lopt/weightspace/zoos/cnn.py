"""CNN zoos: small CNNs trained on the 8x8 digits, labelled by held-out accuracy.

``cnn_digits`` (Small CNN Zoo style, Unterthiner et al. 2020): one
architecture, runs with random training hyperparameters (optimizer Adam or
SGD with momentum, log-uniform learning rate, weight decay and init scale,
dropout before the head, fraction of the training set), several checkpoints
per run. ``cnn_wild`` (CNN Wild Park style, Kofinas et al. 2024): sampled
architectures of 2-5 blocks, widths, kernels 3/5/7, seven activations,
residual connections and BatchNorm on or off; whole architecture *families*
(everything but the width) are test-only.

Every checkpoint is one network of the zoo; its label is its accuracy on the
360 held-out digits (meta_train's held-out split), and its record also holds
the test loss, the accuracy and loss on the whole training set, the run's
hyperparameters, the step and epoch, and ``diverged_at`` (the step at which
an update made the weights non-finite; the run keeps its last finite weights
from then on, so no zoo holds NaNs). Splits are by run: all checkpoints of a
run share one.

Full zoos (seed 0): ``cnn_digits`` test accuracy q10 / median / q90 =
0.08 / 0.48 / 0.95 (median by checkpoint: 0.12 at step 25 up to 0.92 at step
800), no diverged run; ``cnn_wild`` 0.09 / 0.61 / 0.96 over 206 families, 52
of them (75 architectures, 2,700 nets) test-only, 5 diverged runs. The
histograms and quantiles per step, split and family are in ``zoo.json``.
``--set architectures=96`` builds the smaller full ``cnn_wild`` of 96
architectures (88 families, 22 test-only); why the preset has 288:
``docs/design-notes-code.md``.

Training (many runs at once with vmap) lives in
:mod:`lopt.weightspace.zoos.cnn_training`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lopt.weightspace.zoos.cnn_training import (
    TrainingConfig,
    digits_images,
    sample_hyperparameters,
    train_runs,
)
from lopt.weightspace.zoos.specs import normalize_spec
from lopt.weightspace.zoos.store import Chunk, ZooPlan, derive_seed, describe

__all__ = [
    "CnnZooConfig",
    "PRESETS",
    "WildZooConfig",
    "plan_cnn_zoo",
    "plan_wild_zoo",
]

_SPLIT_KEY, _ARCH_KEY, _BATCH_KEY = 1_000_000_001, 1_000_000_002, 1_000_000_003


@dataclass(frozen=True)
class CnnZooConfig(TrainingConfig):
    """A homogeneous CNN zoo (see :class:`TrainingConfig` for the training fields).

    Attributes:
        runs: training runs; the zoo has ``runs * len(checkpoints)`` nets.
        runs_per_chunk: runs trained together and stored in one chunk.
        channels, kernels, strides, activation, batchnorm, residual: the
            architecture (a ``"cnn"`` spec).
        test_fraction: runs held out for test.
    """

    runs: int = 1024
    runs_per_chunk: int = 64
    channels: tuple[int, ...] = (8, 16, 16)
    kernels: tuple[int, ...] = (3, 3, 3)
    strides: tuple[int, ...] = (1, 2, 2)
    activation: str = "relu"
    batchnorm: bool = False
    residual: bool = False
    test_fraction: float = 0.2


@dataclass(frozen=True)
class WildZooConfig(TrainingConfig):
    """A heterogeneous CNN zoo (see :class:`TrainingConfig` for the training fields).

    Attributes:
        architectures: architectures sampled without replacement from the
            grid of the fields below; one chunk each.
        runs_per_architecture: runs per architecture.
        depths, widths, kernels, activations, residual, batchnorm: the grid.
            Strides are 1, 2, 2, 1, 1 (8x8 -> 4x4 -> 2x2).
        test_family_fraction: architecture families (depth, kernel,
            activation, residual, batchnorm: all but the width) whose nets
            are all test-only.
    """

    architectures: int = 288
    runs_per_architecture: int = 12
    checkpoints: tuple[int, ...] = (50, 150, 400)
    depths: tuple[int, ...] = (2, 3, 4, 5)
    widths: tuple[int, ...] = (4, 8, 12, 16)
    kernels: tuple[int, ...] = (3, 5, 7)
    activations: tuple[str, ...] = (
        "relu",
        "leaky_relu",
        "gelu",
        "silu",
        "elu",
        "tanh",
        "sigmoid",
    )
    residual: tuple[bool, ...] = (False, True)
    batchnorm: tuple[bool, ...] = (False, True)
    test_family_fraction: float = 0.25


PRESETS: dict[str, dict[str, Any]] = {
    "cnn_digits": {
        "quick": CnnZooConfig(runs=48, runs_per_chunk=48, checkpoints=(20, 80, 240)),
        "full": CnnZooConfig(),
    },
    "cnn_wild": {
        "quick": WildZooConfig(
            architectures=8, runs_per_architecture=6, checkpoints=(40, 160)
        ),
        "full": WildZooConfig(),
    },
}


def _chunk_from_runs(
    spec_id: str,
    spec: dict[str, Any],
    run_ids: list[int],
    runs: list[dict[str, Any]],
    splits: list[str],
    checkpoints: tuple[int, ...],
    generator: torch.Generator,
    extra: dict[str, Any] | None = None,
) -> Chunk:
    """Train ``runs`` and lay out every checkpoint as a net of one chunk."""
    num_train = len(digits_images()[0])
    results = train_runs(spec, runs, checkpoints, generator)
    nets: list[dict[str, Any]] = []
    stacks: dict[str, list[torch.Tensor]] = {}
    for step, state, metrics in results:
        for key, value in state.items():
            stacks.setdefault(key, []).append(value)
        for i, (run, hparams, split) in enumerate(zip(run_ids, runs, splits)):
            diverged = int(metrics["diverged_at"][i])
            batch = hparams["batch_size"]
            subset = max(batch, round(hparams["data_fraction"] * num_train))
            nets.append(
                {
                    "spec": spec_id,
                    "row": len(nets),
                    "label": float(metrics["test_accuracy"][i]),
                    "split": split,
                    "run": run,
                    "step": step,
                    "epochs": step * batch / subset,
                    "test_accuracy": float(metrics["test_accuracy"][i]),
                    "test_loss": _json_float(metrics["test_loss"][i]),
                    "train_accuracy": float(metrics["train_accuracy"][i]),
                    "train_loss": _json_float(metrics["train_loss"][i]),
                    "diverged_at": diverged if diverged >= 0 else None,
                    "hparams": hparams,
                    **(extra or {}),
                }
            )
    params = {k: torch.cat(v) for k, v in stacks.items()}
    return Chunk(nets, {spec_id: params})


def _json_float(value: torch.Tensor) -> float | None:
    """A loss for JSON: ``None`` where it overflowed (huge logits)."""
    value = float(value)
    return value if np.isfinite(value) else None


def _label_summary(nets: list[dict[str, Any]]) -> dict[str, Any]:
    acc = [n["label"] for n in nets]
    histogram, _ = np.histogram(acc, bins=10, range=(0.0, 1.0))
    by_step: dict[int, list[float]] = {}
    for n in nets:
        by_step.setdefault(n["step"], []).append(n["label"])
    splits = {
        s: describe([n["label"] for n in nets if n["split"] == s])
        for s in ("train", "val", "test")
        if any(n["split"] == s for n in nets)
    }
    return {
        "num_nets": len(nets),
        "num_runs": len({n["run"] for n in nets}),
        "test_accuracy": describe(acc),
        "test_accuracy_histogram": {
            "bins": [round(0.1 * i, 1) for i in range(11)],
            "counts": histogram.tolist(),
        },
        "test_accuracy_by_step": {
            str(k): describe(v) for k, v in sorted(by_step.items())
        },
        "test_accuracy_by_split": splits,
        "diverged_runs": len({n["run"] for n in nets if n["diverged_at"] is not None}),
        "split_counts": {
            s: sum(n["split"] == s for n in nets) for s in ("train", "val", "test")
        },
    }


_DATA = {
    "dataset": "sklearn.datasets.load_digits, 8x8, 1 channel",
    "inputs": "lopt.weightspace.zoos.cnn.digits_images(): pixels / 16, "
    "standardised with the training mean and std",
    "split_rule": "permutation(default_rng(0)) of the 1,797 images, last 20% "
    "(360) held out, as meta_train",
}
_LABELS = {
    "type": "regression",
    "description": "accuracy on the 360 held-out digits (record: test_accuracy)",
}
_RECORDS = (
    "run, step, epochs, test_accuracy, test_loss, train_accuracy, train_loss "
    "(whole training set), diverged_at, hparams (optimizer, lr, weight_decay, "
    "init_scale, dropout, data_fraction, batch_size, init_seed, data_seed)"
)


def _run_splits(num_runs: int, seed: int, test: float, val: float) -> list[str]:
    order = np.random.default_rng(derive_seed(seed, _SPLIT_KEY)).permutation(num_runs)
    splits = ["train"] * num_runs
    num_test, num_val = round(test * num_runs), round(val * num_runs)
    for rank, run in enumerate(order):
        if rank < num_test:
            splits[run] = "test"
        elif rank < num_test + num_val:
            splits[run] = "val"
    return splits


def _chunk_generator(seed: int, k: int) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(seed, _BATCH_KEY, k))


def plan_cnn_zoo(config: CnnZooConfig, seed: int) -> ZooPlan:
    """The plan of a homogeneous CNN zoo (``cnn_digits``)."""
    spec = normalize_spec(
        {
            "kind": "cnn",
            "channels": list(config.channels),
            "kernels": list(config.kernels),
            "strides": list(config.strides),
            "activation": config.activation,
            "batchnorm": config.batchnorm,
            "residual": config.residual,
        }
    )
    checkpoints = tuple(sorted(set(config.checkpoints)))
    splits = _run_splits(config.runs, seed, config.test_fraction, config.val_fraction)
    per_chunk = config.runs_per_chunk
    num_chunks = -(-config.runs // per_chunk)

    def build_chunk(k: int) -> Chunk:
        run_ids = list(range(k * per_chunk, min(config.runs, (k + 1) * per_chunk)))
        runs = [sample_hyperparameters(config, seed, r) for r in run_ids]
        return _chunk_from_runs(
            "cnn",
            spec,
            run_ids,
            runs,
            [splits[r] for r in run_ids],
            checkpoints,
            _chunk_generator(seed, k),
        )

    header = {
        "specs": {"cnn": spec},
        "num_chunks": num_chunks,
        "num_nets": config.runs * len(checkpoints),
        "data": _DATA,
        "labels": _LABELS,
        "splits": {
            "unit": "run: all checkpoints of a run share its split",
            "counts_runs": {s: splits.count(s) for s in ("train", "val", "test")},
        },
        "records": _RECORDS,
    }
    return ZooPlan(header, build_chunk, _label_summary)


def _family(spec: dict[str, Any]) -> str:
    return "d{}-k{}-{}-{}-{}".format(
        len(spec["channels"]),
        spec["kernels"][0],
        spec["activation"],
        "res" if spec["residual"] else "plain",
        "bn" if spec["batchnorm"] else "nobn",
    )


def plan_wild_zoo(config: WildZooConfig, seed: int) -> ZooPlan:
    """The plan of a heterogeneous CNN zoo (``cnn_wild``)."""
    grid = list(
        itertools.product(
            config.depths,
            config.widths,
            config.kernels,
            config.activations,
            config.residual,
            config.batchnorm,
        )
    )
    if not 1 <= config.architectures <= len(grid):
        raise ValueError(
            f"Invalid number of architectures: {config.architectures} (the grid "
            f"has {len(grid)})"
        )
    rng = np.random.default_rng(derive_seed(seed, _ARCH_KEY))
    specs: dict[str, dict[str, Any]] = {}
    for a, g in enumerate(rng.choice(len(grid), config.architectures, replace=False)):
        depth, width, kernel, activation, residual, batchnorm = grid[g]
        specs[f"a{a:03d}"] = normalize_spec(
            {
                "kind": "cnn",
                "channels": [int(width)] * depth,
                "kernels": [int(kernel)] * depth,
                "strides": [1, 2, 2, 1, 1][:depth],
                "activation": str(activation),
                "batchnorm": bool(batchnorm),
                "residual": bool(residual),
            }
        )
    families = sorted({_family(s) for s in specs.values()})
    order = np.random.default_rng(derive_seed(seed, _SPLIT_KEY)).permutation(
        len(families)
    )
    num_test = min(
        len(families) - 1, max(1, round(config.test_family_fraction * len(families)))
    )
    test_families = sorted(families[i] for i in order[:num_test])
    test_specs = [k for k, s in specs.items() if _family(s) in test_families]
    runs_each = config.runs_per_architecture
    checkpoints = tuple(sorted(set(config.checkpoints)))
    val_splits = _run_splits(
        config.architectures * runs_each, seed, 0.0, config.val_fraction
    )

    def build_chunk(k: int) -> Chunk:
        spec_id = f"a{k:03d}"
        spec = specs[spec_id]
        run_ids = list(range(k * runs_each, (k + 1) * runs_each))
        runs = [sample_hyperparameters(config, seed, r) for r in run_ids]
        test = spec_id in test_specs
        splits = ["test" if test else val_splits[r] for r in run_ids]
        return _chunk_from_runs(
            spec_id,
            spec,
            run_ids,
            runs,
            splits,
            checkpoints,
            _chunk_generator(seed, k),
            {"family": _family(spec)},
        )

    def summarise(nets: list[dict[str, Any]]) -> dict[str, Any]:
        out = _label_summary(nets)
        out["test_accuracy_by_family"] = {
            f: describe([n["label"] for n in nets if n["family"] == f])
            for f in families
        }
        return out

    header = {
        "specs": specs,
        "num_chunks": config.architectures,
        "num_nets": config.architectures * runs_each * len(checkpoints),
        "data": _DATA,
        "labels": _LABELS,
        "splits": {
            "unit": "architecture family (depth, kernel, activation, residual, "
            "batchnorm; all widths): test families are test-only; other runs "
            "are train or val",
            "families": families,
            "test_families": test_families,
            "test_specs": test_specs,
        },
        "records": _RECORDS + ", family",
    }
    return ZooPlan(header, build_chunk, summarise)
