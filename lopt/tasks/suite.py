"""The held-out benchmark suite: tasks never seen in meta-training.

The shipped rule was meta-trained on MLPs (width <= 128, depth <= 3) on
``mnist1d`` and digits and small 1-D CNNs on ``mnist1d``, and its checkpoint was
selected on such nets up to width 256. Every task here differs in
architecture, data or both (the wide digits MLP, 256-256, is the closest: same
data, a width validation saw, a shape it did not): a wide and a
deep MLP, a CNN, an autoencoder, a one-layer transformer, an LSTM, a GRU, logistic
regressions on tabular data and an MLP on badly scaled inputs.

Each is a :class:`~lopt.tasks.task.Task` (a seeded model constructor, a
seeded batch sampler, the train loss and a held-out metric; the class, the
metrics and the losses live in :mod:`lopt.tasks.task` and are re-exported
here); :func:`get_tasks` looks tasks up by name.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lopt.tasks import data as datasets
from lopt.tasks.data import Dataset
from lopt.tasks.task import ACCURACY, MSE, HeldOutMetric, Task, cross_entropy

__all__ = [
    "HeldOutMetric",
    "Task",
    "ACCURACY",
    "MSE",
    "cross_entropy",
    "TASKS",
    "get_tasks",
    "mlp",
    "mlp_task",
]


# ----------------------------------------------------------------------- models
def mlp(sizes: Sequence[int], activation: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    """Fully connected net ``sizes[0] -> ... -> sizes[-1]``, no final activation."""
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        if i > 0:
            layers.append(activation())
        layers.append(nn.Linear(fan_in, fan_out))
    return nn.Sequential(*layers)


def _digits_cnn(data: Dataset) -> nn.Module:
    # Two conv + max-pool stages on the 8x8 image, then flatten (32 x 2 x 2).
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 2 * 2, data.num_classes),
    )


class TinyTransformer(nn.Module):
    """Token embedding + learned positions, one encoder layer, per-token head."""

    def __init__(self, vocab: int, length: int, width: int = 32, heads: int = 4):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(torch.randn(length, width) / math.sqrt(width))
        self.encoder = nn.TransformerEncoderLayer(
            width, heads, dim_feedforward=2 * width, dropout=0.0, batch_first=True
        )
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, L)`` tokens -> ``(B, L, vocab)`` logits."""
        return self.head(self.encoder(self.embed(tokens) + self.position))


class SequenceClassifier(nn.Module):
    """A recurrent net (``nn.GRU`` or ``nn.LSTM``) over a signal cut into
    ``steps`` chunks, classified from the last hidden state."""

    def __init__(
        self, length: int, steps: int, hidden: int, classes: int, cell: str = "gru"
    ):
        super().__init__()
        if length % steps:
            raise ValueError(f"Invalid steps: {steps} (must divide {length})")
        if cell not in ("gru", "lstm"):
            raise ValueError(f"Invalid cell: {cell!r} (expected 'gru' or 'lstm')")
        self.steps = steps
        rnn = nn.GRU if cell == "gru" else nn.LSTM
        self.rnn = rnn(length // steps, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, length)`` signal -> ``(B, classes)`` logits."""
        _, last = self.rnn(x.reshape(len(x), self.steps, -1))
        if isinstance(last, tuple):  # LSTM: (h, c)
            last = last[0]
        return self.head(last[-1])


# ------------------------------------------------------------------------ tasks
def _autoencoding(load: Callable[[], Dataset]) -> Callable[[], Dataset]:
    """A loader whose targets are the inputs themselves."""

    def loader() -> Dataset:
        d = load()
        return Dataset(d.x_train, d.x_train, d.x_test, d.x_test, 0)

    return loader


def _standardised(load: Callable[[], Dataset]) -> Callable[[], Dataset]:
    cache: list[Dataset] = []

    def loader() -> Dataset:
        if not cache:
            cache.append(datasets.standardise(load()))
        return cache[0]

    return loader


def mlp_task(
    name: str,
    load_data: Callable[[], Dataset],
    hidden: Sequence[int],
    *,
    description: str = "",
    activation: type[nn.Module] = nn.ReLU,
    batch_size: int = 128,
) -> Task:
    """A classification task with an MLP of the given hidden widths.

    Args:
        name: task identifier.
        load_data: data loader (a function of :mod:`lopt.tasks.data`).
        hidden: hidden-layer widths, e.g. ``[256, 256]``.
        description: one line; generated when empty.
        activation: hidden activation.
        batch_size: examples per step.
    """

    def build(data: Dataset) -> nn.Module:
        return mlp([data.num_features, *hidden, data.num_classes], activation)

    return Task(
        name,
        description or f"MLP {'-'.join(map(str, hidden))}",
        load_data,
        build,
        cross_entropy,
        ACCURACY,
        batch_size,
    )


def _build_suite() -> dict[str, Task]:
    tasks = [
        mlp_task(
            "digits_mlp_wide",
            datasets.digits,
            [256, 256],
            description="digits, MLP 256-256 (wide)",
        ),
        mlp_task(
            "mnist1d_mlp_deep",
            datasets.mnist1d,
            [64] * 7,
            description="mnist1d, MLP 7x64 (8 layers, deep)",
        ),
        Task(
            "digits_cnn",
            "digits 8x8, CNN 16-32 + max-pool + flatten",
            datasets.digits,
            _digits_cnn,
            cross_entropy,
            ACCURACY,
        ),
        Task(
            "digits_autoencoder",
            "digits, MLP autoencoder 64-128-32-128-64 (MSE)",
            _autoencoding(datasets.digits),
            lambda d: mlp([64, 128, 32, 128, 64]),
            F.mse_loss,
            MSE,
        ),
        Task(
            "reverse_transformer",
            "reverse 8 tokens (vocab 16), 1-layer transformer d=32",
            datasets.reversal_sequences,
            lambda d: TinyTransformer(d.num_classes, d.x_train.shape[1]),
            cross_entropy,
            ACCURACY,
        ),
        Task(
            "mnist1d_lstm",
            "mnist1d as 10 steps x 4, LSTM 32",
            datasets.mnist1d,
            lambda d: SequenceClassifier(d.num_features, 10, 32, d.num_classes, "lstm"),
            cross_entropy,
            ACCURACY,
        ),
        Task(
            "mnist1d_gru",
            "mnist1d as 10 steps x 4, GRU 48",
            datasets.mnist1d,
            lambda d: SequenceClassifier(d.num_features, 10, 48, d.num_classes),
            cross_entropy,
            ACCURACY,
        ),
        Task(
            "breast_cancer_logreg",
            "breast cancer (standardised), logistic regression",
            _standardised(datasets.breast_cancer),
            lambda d: nn.Linear(d.num_features, d.num_classes),
            cross_entropy,
            ACCURACY,
            batch_size=64,
        ),
        Task(
            "wine_logreg",
            "wine (standardised), logistic regression",
            _standardised(datasets.wine),
            lambda d: nn.Linear(d.num_features, d.num_classes),
            cross_entropy,
            ACCURACY,
            batch_size=32,
        ),
        mlp_task(
            "wine_unscaled_mlp",
            datasets.wine,
            [32, 32],
            description="wine, raw features (scales 0.1..1e3), MLP 32-32",
            batch_size=32,
        ),
    ]
    return {t.name: t for t in tasks}


#: All tasks of the held-out suite, by name, in table order.
TASKS: dict[str, Task] = _build_suite()


def get_tasks(names: Sequence[str] | None = None) -> list[Task]:
    """Tasks by name (all of :data:`TASKS` when ``names`` is empty or ``None``).

    Raises:
        ValueError: for an unknown name, listing the known ones.
    """
    if not names:
        return list(TASKS.values())
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise ValueError(
            f"Invalid task: {', '.join(unknown)} (known: {', '.join(TASKS)})"
        )
    return [TASKS[n] for n in names]
