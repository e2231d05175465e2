"""The task interface shared by the benchmark suite and meta-training.

A :class:`Task` is one training problem: a data set with a fixed held-out
split, a model built from a seed, minibatches drawn from a seeded generator,
a train loss and a held-out metric. The held-out suite
(:mod:`lopt.tasks.suite`) and the meta-training task family
(:func:`lopt.tasks.families.make_task`) build tasks of this one class, and one
inner loop (:mod:`lopt.tasks.loop`) trains either.

The train loss comes two ways, equal for the same weights: :meth:`Task.loss`
for a module (training with a ``torch.optim`` optimizer, evaluating) and
:meth:`Task.functional_loss` for a list of parameter tensors that stand in for
the module's (meta-training's unrolls, whose parameters are results of the
learned optimizer's differentiable steps, not a module's leaves).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from lopt.tasks.data import Dataset

__all__ = [
    "HeldOutMetric",
    "Task",
    "ACCURACY",
    "MSE",
    "cross_entropy",
    "suite_batch_seed",
]


@dataclass(frozen=True)
class HeldOutMetric:
    """A metric computed on the held-out split.

    Attributes:
        name: short name for tables (``"accuracy"``, ``"mse"``).
        fn: ``(model output, target) -> value``.
        higher_is_better: direction of improvement.
    """

    name: str
    fn: Callable[[torch.Tensor, torch.Tensor], float]
    higher_is_better: bool


def _accuracy(output: torch.Tensor, target: torch.Tensor) -> float:
    return float((output.argmax(-1) == target).float().mean())


def _mse(output: torch.Tensor, target: torch.Tensor) -> float:
    return float(F.mse_loss(output, target))


ACCURACY = HeldOutMetric("accuracy", _accuracy, higher_is_better=True)
MSE = HeldOutMetric("mse", _mse, higher_is_better=False)


def cross_entropy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the last axis, for per-example or per-token labels."""
    return F.cross_entropy(output.reshape(-1, output.shape[-1]), target.reshape(-1))


def suite_batch_seed(seed: int) -> int:
    """The benchmark suite's batch-generator seed of run ``seed``."""
    return 10_007 * seed + 1


Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Task:
    """One training problem.

    Attributes:
        name: identifier used on the command line and in results.
        description: one line for tables and plots.
        load_data: returns the (cached) train / held-out split.
        build: ``Dataset -> nn.Module``; called under a fixed seed by
            :meth:`make_model`.
        loss_fn: ``(output, target) -> scalar`` train loss.
        metric: the held-out metric.
        batch_size: examples per step.
        batch_seed: run seed -> seed of the run's batch generator
            (:func:`suite_batch_seed` by default; meta-training's family uses
            the run seed itself).
    """

    name: str
    description: str
    load_data: Callable[[], Dataset]
    build: Callable[[Dataset], nn.Module]
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    metric: HeldOutMetric
    batch_size: int = 128
    batch_seed: Callable[[int], int] = suite_batch_seed

    @property
    def data(self) -> Dataset:
        """The task's data set (loaded once per process)."""
        return self.load_data()

    def make_model(self, seed: int) -> nn.Module:
        """A freshly initialised model; the same ``seed`` gives the same weights.

        The global RNG is forked, so building a model leaves it untouched.
        """
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.build(self.data)

    def batch_generator(self, seed: int) -> torch.Generator:
        """The generator :meth:`sample_batch` draws from for run ``seed``."""
        return torch.Generator().manual_seed(self.batch_seed(seed))

    def sample_batch(self, generator: torch.Generator) -> Batch:
        """Draw a training batch (with replacement) using ``generator``."""
        data = self.data
        index = torch.randint(
            0, len(data.x_train), (self.batch_size,), generator=generator
        )
        return data.x_train[index], data.y_train[index]

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Train loss of ``model`` on ``batch``."""
        x, y = batch
        return self.loss_fn(model(x), y)

    def functional_loss(
        self, model: nn.Module, params: Sequence[torch.Tensor], batch: Batch
    ) -> torch.Tensor:
        """Train loss on ``batch`` of ``model``'s function at ``params``.

        ``params`` stand in for the model's parameters, one tensor each, in
        ``model.parameters()`` order; the model's own values are not read
        (only its buffers, if any). The loss is differentiable in ``params``
        and equals :meth:`loss` of a model holding those values.

        Raises:
            ValueError: when ``params`` has another length than the model's
                parameter list.
        """
        names = [name for name, _ in model.named_parameters()]
        if len(params) != len(names):
            raise ValueError(
                f"Invalid params: {len(params)} tensors for a model with "
                f"{len(names)} parameters"
            )
        x, y = batch
        return self.loss_fn(functional_call(model, dict(zip(names, params)), (x,)), y)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Held-out metric and held-out loss on the whole held-out split."""
        was_training = model.training
        model.eval()
        try:
            output = model(self.data.x_test)
            target = self.data.y_test
            return {
                "metric": self.metric.fn(output, target),
                "loss": float(self.loss_fn(output, target)),
            }
        finally:
            model.train(was_training)

    def num_params(self) -> int:
        """Number of trainable scalars of the task's model."""
        return sum(p.numel() for p in self.make_model(0).parameters())
