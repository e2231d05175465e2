"""The image data of the vision workloads (:mod:`.resnet`, :mod:`.vit`,
:mod:`.finetune`): scikit-learn's digits, upsampled, split and augmented.

Data: ``sklearn.datasets.load_digits`` (1,797 grey 8x8 images of the digits
0-9, shipped with scikit-learn, nothing downloaded), scaled to [0, 1] and
upsampled bilinearly to ``size`` x ``size``. A fixed stratified split holds
out 20% of every class (360 images; the same for every seed and size), so
the held-out accuracy of every run is read on the same images.

Training batches are drawn epoch by epoch from a seeded permutation and
augmented the way small-image training scripts do, but never flipped (a
mirrored 2 or 5 is no digit): a small random rotation and scaling, a random
translation of a few pixels (zero padding then a random crop) and a little
pixel noise. The held-out images are never augmented.

All randomness (model initialisation, batch order, augmentation) comes from
the job's seed, so every optimizer sees the same batches.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.optim.workloads.spec import Job

__all__ = [
    "classifier_job",
    "Digits",
    "digits",
    "subset",
    "augment",
    "BatchStream",
    "cross_entropy",
    "classifier_evaluation",
    "seeded_init",
]

#: Fraction of every class held out.
HELD_OUT_FRACTION = 0.2
#: Seed of the held-out split: fixed, so every run is judged on the same images.
SPLIT_SEED = 2026
#: Offset between the job seed and its data generator's seed, so the batch
#: order is not the same random stream as the initialisation.
DATA_SEED_OFFSET = 10_000


@dataclass(frozen=True)
class Digits:
    """The split at one image size.

    Attributes:
        x_train: training images, ``(N, 1, size, size)`` in [0, 1] (raw, so
            augmentation pads with the true background, 0).
        y_train: their labels (0-9).
        x_val: held-out images, normalised with the training statistics.
        y_val: their labels.
        mean, std: the training pixels' mean and standard deviation.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    mean: float
    std: float

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] as the networks see them."""
        return (x - self.mean) / self.std


@functools.lru_cache(maxsize=4)
def digits(size: int) -> Digits:
    """The digits upsampled to ``size`` x ``size`` and split (cached).

    Args:
        size: the image side (8: the original images).

    Raises:
        ValueError: ``size`` below 8.
    """
    if size < 8:
        raise ValueError(f"Invalid image size: {size} (need >= 8)")
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        x = x.clamp_(0.0, 1.0)  # bilinear stays in range; clamp guards rounding
    gen = torch.Generator().manual_seed(SPLIT_SEED)
    held_out = []
    for c in range(10):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        held_out.append(idx[: round(HELD_OUT_FRACTION * len(idx))])
    val = torch.zeros(len(y), dtype=torch.bool)
    val[torch.cat(held_out)] = True
    x_train, y_train = x[~val], y[~val]
    mean, std = float(x_train.mean()), float(x_train.std())
    return Digits(x_train, y_train, (x[val] - mean) / std, y[val], mean, std)


def subset(
    x: torch.Tensor,
    y: torch.Tensor,
    classes: Sequence[int],
    per_class: int | None = None,
    seed: int = SPLIT_SEED,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The images of ``classes``, relabelled ``0 .. len(classes) - 1``.

    Args:
        x, y: images and labels.
        classes: the labels kept, in their new order.
        per_class: keep this many (drawn with ``seed``) of each class; all
            when ``None``.
        seed: the draw's seed (fixed by default: the subset is part of the
            workload, not of the run).

    Raises:
        ValueError: a class with fewer than ``per_class`` images.
    """
    gen = torch.Generator().manual_seed(seed)
    xs, ys = [], []
    for new, c in enumerate(classes):
        idx = torch.nonzero(y == c).flatten()
        if per_class is not None:
            if len(idx) < per_class:
                raise ValueError(
                    f"Invalid per_class: {per_class} (class {c} has {len(idx)})"
                )
            idx = idx[torch.randperm(len(idx), generator=gen)[:per_class]].sort()[0]
        xs.append(x[idx])
        ys.append(torch.full((len(idx),), new, dtype=torch.long))
    return torch.cat(xs), torch.cat(ys)


def augment(
    x: torch.Tensor,
    gen: torch.Generator,
    shift: int = 2,
    degrees: float = 10.0,
    scale: float = 0.1,
    noise: float = 0.03,
) -> torch.Tensor:
    """Randomly rotated, scaled, translated and noised copies of ``x``.

    Args:
        x: images ``(B, C, H, W)`` in [0, 1] with background 0.
        gen: the job's data generator.
        shift: largest translation in pixels (each axis).
        degrees: largest rotation either way.
        scale: largest relative zoom either way.
        noise: standard deviation of the added Gaussian pixel noise.
    """
    b, c, h, w = x.shape
    angle = (torch.rand(b, generator=gen) * 2 - 1) * math.radians(degrees)
    zoom = 1 + (torch.rand(b, generator=gen) * 2 - 1) * scale
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack(
        [
            torch.stack([cos, -sin, torch.zeros(b)], 1),
            torch.stack([sin, cos, torch.zeros(b)], 1),
        ],
        1,
    )
    grid = F.affine_grid(theta, [b, c, h, w], align_corners=False)
    x = F.grid_sample(
        x, grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )
    if shift:
        # Integer translation by padding and cropping each image at its own
        # offset, gathered in one indexing op rather than a per-image loop.
        padded = F.pad(x, (shift, shift, shift, shift))
        dy = torch.randint(0, 2 * shift + 1, (b,), generator=gen)
        dx = torch.randint(0, 2 * shift + 1, (b,), generator=gen)
        rows = (dy[:, None] + torch.arange(h))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w))[:, None, None, :]
        batch = torch.arange(b)[:, None, None, None]
        chans = torch.arange(c)[None, :, None, None]
        x = padded[batch, chans, rows, cols]
    if noise:
        x = x + noise * torch.randn(x.shape, generator=gen)
    return x


class BatchStream:
    """Augmented, normalised training batches, epoch by epoch (the last
    incomplete batch of an epoch is dropped, as ``drop_last`` loaders do).

    Args:
        data: the split whose statistics normalise the batches.
        x, y: the training images (raw, in [0, 1]) and labels.
        batch_size: images per batch (at most ``len(x)``).
        seed: the job seed (the stream's generator is seeded from it).
        augmentation: keyword arguments of :func:`augment`; ``None``: none.
    """

    def __init__(
        self,
        data: Digits,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        seed: int,
        augmentation: dict | None = None,
    ):
        if not 0 < batch_size <= len(x):
            raise ValueError(f"Invalid batch_size: {batch_size} (have {len(x)})")
        self.data, self.x, self.y = data, x, y
        self.batch_size = batch_size
        self.augmentation = augmentation
        self.gen = torch.Generator().manual_seed(DATA_SEED_OFFSET + seed)
        self._order: Iterator[torch.Tensor] = iter(())

    def _next_indices(self) -> torch.Tensor:
        idx = next(self._order, None)
        if idx is None:
            perm = torch.randperm(len(self.x), generator=self.gen)
            whole = len(perm) // self.batch_size * self.batch_size
            self._order = iter(perm[:whole].split(self.batch_size))
            idx = next(self._order)
        return idx

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self._next_indices()
        x = self.x[idx]
        if self.augmentation is not None:
            x = augment(x, self.gen, **self.augmentation)
        return self.data.normalise(x), self.y[idx]


def cross_entropy(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]):
    """The train loss of a classification batch."""
    return F.cross_entropy(model(batch[0]), batch[1])


def classifier_evaluation(
    x_val: torch.Tensor, y_val: torch.Tensor
) -> Callable[[nn.Module], dict[str, float]]:
    """``evaluate`` of a classification job: held-out loss and accuracy, in
    eval mode (BatchNorm's running statistics) without gradients; the model's
    mode is restored afterwards."""

    def evaluate(model: nn.Module) -> dict[str, float]:
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                out = model(x_val)
        finally:
            model.train(was_training)
        return {
            "val_loss": float(F.cross_entropy(out, y_val)),
            "accuracy": float((out.argmax(1) == y_val).float().mean()),
        }

    return evaluate


@contextmanager
def seeded_init(seed: int):
    """Build modules inside this block to initialise them from ``seed``
    without touching the caller's global random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def classifier_job(
    model: nn.Module,
    stream: BatchStream,
    x_val: torch.Tensor,
    y_val: torch.Tensor,
    groups: tuple[list[nn.Parameter], list[nn.Parameter]],
    matrices: list[nn.Parameter],
) -> Job:
    """The :class:`Job` of an image classifier: ``stream``'s batches, the
    cross-entropy train loss, held-out loss and accuracy on ``(x_val, y_val)``,
    the ``(decay, no_decay)`` groups and Muon's ``matrices``."""
    decay, no_decay = groups
    evaluate = classifier_evaluation(x_val, y_val)
    return Job(model, stream, cross_entropy, evaluate, decay, no_decay, matrices)
