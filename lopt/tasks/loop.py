"""The inner training loop shared by the benchmarks and meta-training.

:func:`run` trains a :class:`~lopt.tasks.task.Task` for a step budget: each
step draws a minibatch from the run's generator, records the loss before the
step, stops the run when it diverges, and has a :class:`Learner` take the step.
A learner holds the weights being trained and says how they move:

- :class:`ModuleLearner`: the task's model and a ``torch.optim`` optimizer
  (every benchmark run; Adam, the reference of meta-training's validation);
- :class:`RuleLearner`: flat parameters stepped by a learned rule through
  :func:`lopt.optim.functional.ng_step`, the reference step, as meta-training's
  validation, ``meta_train.select`` and distillation run a rule.

:func:`trajectory` is the same loop step by step, for callers that look at
the run before each step (distillation's snapshots).

Meta-training's unrolls (:mod:`meta_train.unroll`) keep their own loop: it is
differentiable in the rule's weights, adds gradient noise and measures
divergence against the task's loss at step 0 of its whole horizon.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from lopt.graph import NeuralGraph
from lopt.optim.functional import init_state, ng_step
from lopt.optim.orthogonal import hidden_matrices, ortho_plan
from lopt.optim.rule import UpdateRule
from lopt.tasks.task import Batch, Task

__all__ = [
    "EvalWeights",
    "Learner",
    "ModuleLearner",
    "RuleLearner",
    "Curve",
    "run",
    "trajectory",
]


class EvalWeights:
    """Which weights a run is read at: by default the trained weights themselves.

    The training loop calls :meth:`start` once before the first step,
    :meth:`after_step` after every ``optimizer.step()``, and evaluates
    (held-out metric; the recorded train loss when :attr:`averaged`) the model
    that :meth:`weights` yields.

    Args:
        model: the model being trained.
    """

    #: Whether the evaluated weights differ from those gradients are taken at
    #: (then the loop records each step's loss at the evaluated weights).
    averaged = False

    def __init__(self, model: nn.Module):
        self.model = model

    def start(self) -> None:
        """Called once before the first step."""

    def after_step(self) -> None:
        """Called after every ``optimizer.step()``."""

    @contextmanager
    def weights(self) -> Iterator[nn.Module]:
        """The model holding the weights to evaluate, for the ``with`` block."""
        yield self.model


class Learner(Protocol):
    """The weights a run trains and how one step moves them."""

    def loss(self, task: Task, batch: Batch) -> float:
        """The loss recorded for this step, on ``batch`` at the current
        weights; also prepares the step (computes the gradient)."""

    def step(self) -> None:
        """Take the step prepared by the last :meth:`loss`."""


class ModuleLearner:
    """A model trained by a ``torch.optim`` optimizer.

    Args:
        model: the task's model; its parameters are trained in place.
        optimizer: an optimizer over ``model``'s parameters.
        evaluation: which weights the run is read at (``None``: the model's
            own; see :class:`EvalWeights`, whose
            ``after_step`` is called after every optimizer step). When they
            are ``averaged``, each step records the batch's loss at them
            (without gradient, before the training forward pass), and a step
            whose training loss is not finite records NaN, so that the run
            diverges there whatever the evaluated weights give.

    Attributes:
        evaluation_s: wall-clock seconds spent on those evaluations (the
            benchmarks leave them out of the step time).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        evaluation: EvalWeights | None = None,
    ):
        self.model = model
        self.optimizer = optimizer
        self.evaluation = evaluation
        self.evaluation_s = 0.0
        self._loss: torch.Tensor | None = None

    def loss(self, task: Task, batch: Batch) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        averaged = self.evaluation is not None and self.evaluation.averaged
        if averaged:
            tick = time.perf_counter()
            with torch.no_grad(), self.evaluation.weights() as evaluated:
                value = float(task.loss(evaluated, batch))
            self.evaluation_s += time.perf_counter() - tick
        with torch.enable_grad():
            self._loss = task.loss(self.model, batch)
        train_value = float(self._loss.detach())
        if not averaged:
            return train_value
        return value if math.isfinite(train_value) else math.nan

    def step(self) -> None:
        if self._loss is None:
            raise RuntimeError("ModuleLearner.step() before loss(): no gradient")
        self._loss.backward()
        self._loss = None
        self.optimizer.step()
        if self.evaluation is not None:
            self.evaluation.after_step()


class RuleLearner:
    """Flat parameters stepped by a learned rule through
    :func:`lopt.optim.functional.ng_step` (the reference step; ``NGOptimizer``
    computes it through a fused kernel where that applies, equal to float32
    rounding only).

    The loss is the task's :meth:`~lopt.tasks.task.Task.functional_loss` at
    the flat parameters, and the gradient is taken per tensor.

    Args:
        model: the task's model: its parameters are the starting point (copied),
            its architecture computes the loss.
        rule: the update rule.
        orthogonal: orthogonalise the updates of the hidden matrices as
            ``NGOptimizer`` does by default (its guess from the parameter
            order; :mod:`lopt.optim.orthogonal`). ``False`` (the default
            here): the rule's own step, as meta-training unrolls it.

    Attributes:
        graph: the neural graph of the model's parameters.
        params: ``(P,)`` flat parameters (graph order) before the next step.
        grads: ``(P,)`` their gradient on the last batch (after :meth:`loss`).
        state: the optimizer state before the next step.
    """

    def __init__(self, model: nn.Module, rule: UpdateRule, orthogonal: bool = False):
        self.model = model
        self.rule = rule
        start = [p.detach() for p in model.parameters()]
        self.graph = NeuralGraph.from_shapes([p.shape for p in start])
        hidden = hidden_matrices(self.graph.shapes) if orthogonal else []
        self.ortho = ortho_plan(self.graph, hidden)
        self.params = self.graph.flatten(start)  # a copy
        self.state = init_state(self.graph)
        self.grads: torch.Tensor | None = None

    def loss(self, task: Task, batch: Batch) -> float:
        with torch.enable_grad():
            current = self.graph.unflatten(self.params.clone())
            current = [p.requires_grad_(True) for p in current]
            loss = task.functional_loss(self.model, current, batch)
            self.grads = self.graph.flatten(torch.autograd.grad(loss, current))
        return float(loss.detach())

    @torch.no_grad()
    def step(self) -> None:
        if self.grads is None:
            raise RuntimeError("RuleLearner.step() before loss(): no gradient")
        self.params, self.state = ng_step(
            self.rule, self.graph, self.params, self.grads, self.state, ortho=self.ortho
        )
        self.grads = None


@dataclass
class Curve:
    """The losses of one run.

    Attributes:
        losses: the loss recorded before each completed step.
        diverged_at: the step (1-based) at which the run was stopped for
            divergence (``None``: it went through its budget).
        stop_loss: the loss that stopped it (not in ``losses``).
    """

    losses: list[float] = field(default_factory=list)
    diverged_at: int | None = None
    stop_loss: float | None = None

    @property
    def diverged(self) -> bool:
        """Whether the run was stopped for divergence."""
        return self.diverged_at is not None


def trajectory(
    task: Task, learner: Learner, steps: int, generator: torch.Generator
) -> Iterator[float]:
    """Train with ``learner`` for ``steps`` steps on batches of ``task`` drawn
    from ``generator``, yielding each step's loss before the step; the step is
    taken when the caller asks for the next loss (stop iterating to stop the
    run: the last yielded step is then not taken)."""
    for _ in range(steps):
        value = learner.loss(task, task.sample_batch(generator))
        yield value
        learner.step()


def run(
    task: Task,
    learner: Learner,
    steps: int,
    generator: torch.Generator,
    *,
    divergence_factor: float | None = None,
) -> Curve:
    """Train with ``learner`` for ``steps`` steps (see :func:`trajectory`),
    stopping when the run diverges: a loss that is not finite, or (with
    ``divergence_factor``) above ``divergence_factor`` times the first step's
    loss (in absolute value). The diverging step is not taken.
    """
    curve = Curve()
    limit = math.inf
    for step, value in enumerate(trajectory(task, learner, steps, generator), 1):
        if step == 1 and divergence_factor is not None:
            limit = divergence_factor * abs(value)
        if not math.isfinite(value) or value > limit:
            curve.diverged_at, curve.stop_loss = step, value
            break
        curve.losses.append(value)
    return curve
