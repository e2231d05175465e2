"""Run a rule (or Adam) on one task: the training-loss curve shared by the
validation inside meta-training and by ``meta_train.select``, and the run's
states step by step (:func:`rule_trajectory`, for ``meta_train.distill``)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import NamedTuple

import torch

from lopt.features import FeatureState
from lopt.functional import init_state, ng_step
from lopt.graph import NeuralGraph
from lopt.rule import UpdateRule
from meta_train.tasks import TaskConfig, make_task

__all__ = [
    "RunState",
    "rule_trajectory",
    "loss_curve",
    "final_log_ratio",
    "DIVERGED_SCORE",
]

#: Score of a diverged run in :func:`final_log_ratio`: a loss 10x its start.
DIVERGED_SCORE = math.log(10.0)


class RunState(NamedTuple):
    """A learned-optimizer run just before one step."""

    graph: NeuralGraph
    loss: float  # the minibatch loss at ``params``
    params: torch.Tensor  # (P,) flat parameters
    grads: torch.Tensor  # (P,) their gradient on the minibatch
    state: FeatureState  # optimizer state


@torch.no_grad()
def rule_trajectory(
    rule: UpdateRule, config: TaskConfig, steps: int
) -> Iterator[RunState]:
    """Train the task of ``config`` with ``rule`` from its initial weights,
    yielding the run before each of ``steps`` steps; the step is taken when
    the caller asks for the next one (stop iterating to stop the run)."""
    task = make_task(config)
    gen = task.batch_generator(config.seed)
    model = task.make_model(config.seed)
    params = [p.detach().clone() for p in model.parameters()]
    graph = NeuralGraph.from_shapes([p.shape for p in params])
    flat, state = graph.flatten(params), init_state(graph)
    for _ in range(steps):
        batch = task.sample_batch(gen)
        with torch.enable_grad():
            current = [p.requires_grad_(True) for p in graph.unflatten(flat.clone())]
            loss = task.functional_loss(model, current, batch)
            grads = graph.flatten(torch.autograd.grad(loss, current))
        yield RunState(graph, float(loss), flat, grads, state)
        flat, state = ng_step(rule, graph, flat, grads, state)


def _adam_losses(config: TaskConfig, steps: int) -> Iterator[float]:
    """The minibatch losses of Adam(lr=1e-3) on the task, on the same batches."""
    task = make_task(config)
    gen = task.batch_generator(config.seed)
    model = task.make_model(config.seed)
    params = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    adam = torch.optim.Adam(params, lr=1e-3)
    for _ in range(steps):
        batch = task.sample_batch(gen)
        with torch.enable_grad():
            loss = task.functional_loss(model, params, batch)
            grads = torch.autograd.grad(loss, params)
        yield float(loss)
        for p, g in zip(params, grads):
            p.grad = g
        adam.step()


@torch.no_grad()
def loss_curve(
    rule: UpdateRule | None,
    config: TaskConfig,
    steps: int,
    stop_above: float | None = None,
) -> tuple[list[float], bool]:
    """Train the task of ``config`` for ``steps`` steps from its initial weights.

    Args:
        rule: the learned rule, or ``None`` for Adam(lr=1e-3) on the same
            batches.
        config: the task.
        steps: training steps.
        stop_above: stop (as diverged) once a loss exceeds this multiple of
            the first one.

    Returns:
        ``(losses, diverged)``: the minibatch loss before each step (ending in
        ``inf`` after a non-finite loss), and whether the run diverged.
    """
    values = (
        _adam_losses(config, steps)
        if rule is None
        else (run.loss for run in rule_trajectory(rule, config, steps))
    )
    losses: list[float] = []
    for value in values:
        if not math.isfinite(value):
            losses.append(math.inf)
            return losses, True
        losses.append(value)
        if stop_above is not None and value > stop_above * losses[0]:
            return losses, True
    return losses, False


def final_log_ratio(losses: list[float], diverged: bool) -> float:
    """``log(L_final / L_0)`` with ``L_final`` the mean of the last 10% of the
    losses; a diverged run scores :data:`DIVERGED_SCORE` (lower is better)."""
    if diverged:
        return DIVERGED_SCORE
    tail = losses[-max(1, len(losses) // 10) :]
    return math.log(max(sum(tail) / len(tail), 1e-12) / losses[0])
