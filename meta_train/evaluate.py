"""Run a rule (or Adam) on one task of the family: the training-loss curve
shared by the validation inside meta-training and by ``meta_train.select``,
and the run's states step by step (:func:`rule_trajectory`, for
``meta_train.distill``). Both are the benchmarks' inner loop
(:mod:`lopt.tasks.loop`) on the task's :class:`~lopt.tasks.task.Task`."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import NamedTuple

import torch

from lopt.graph import NeuralGraph
from lopt.optim.features import FeatureState
from lopt.optim.rule import UpdateRule
from lopt.tasks.families import TaskConfig, make_task
from lopt.tasks.loop import ModuleLearner, RuleLearner, run, trajectory

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


def rule_trajectory(
    rule: UpdateRule, config: TaskConfig, steps: int
) -> Iterator[RunState]:
    """Train the task of ``config`` with ``rule`` from its initial weights,
    yielding the run before each of ``steps`` steps; the step is taken when
    the caller asks for the next one (stop iterating to stop the run)."""
    task = make_task(config)
    learner = RuleLearner(task.make_model(config.seed), rule)
    generator = task.batch_generator(config.seed)
    for loss in trajectory(task, learner, steps, generator):
        yield RunState(
            learner.graph, loss, learner.params, learner.grads, learner.state
        )


def loss_curve(
    rule: UpdateRule | None,
    config: TaskConfig,
    steps: int,
    stop_above: float | None = None,
    orthogonal: bool = False,
) -> tuple[list[float], bool]:
    """Train the task of ``config`` for ``steps`` steps from its initial weights
    (:func:`lopt.tasks.loop.run` on the task's batches of seed ``config.seed``).

    Args:
        rule: the learned rule (its reference step, :class:`RuleLearner`), or
            ``None`` for Adam(lr=1e-3) on the same batches.
        config: the task.
        steps: training steps.
        stop_above: stop (as diverged) once a loss exceeds this multiple of
            the first one.
        orthogonal: the rule's hidden-matrix updates orthogonalised
            (:class:`RuleLearner`'s ``orthogonal``).

    Returns:
        ``(losses, diverged)``: the minibatch loss before each step, ending
        with the loss that stopped a diverged run (``inf`` for a non-finite
        one), and whether the run diverged.
    """
    task = make_task(config)
    model = task.make_model(config.seed)
    if rule is None:
        learner = ModuleLearner(model, torch.optim.Adam(model.parameters(), lr=1e-3))
    else:
        learner = RuleLearner(model, rule, orthogonal=orthogonal)
    generator = task.batch_generator(config.seed)
    curve = run(task, learner, steps, generator, divergence_factor=stop_above)
    losses = curve.losses
    if curve.diverged:
        losses.append(curve.stop_loss if math.isfinite(curve.stop_loss) else math.inf)
    return losses, curve.diverged


def final_log_ratio(losses: list[float], diverged: bool) -> float:
    """``log(L_final / L_0)`` with ``L_final`` the mean of the last 10% of the
    losses; a diverged run scores :data:`DIVERGED_SCORE` (lower is better)."""
    if diverged:
        return DIVERGED_SCORE
    tail = losses[-max(1, len(losses) // 10) :]
    return math.log(max(sum(tail) / len(tail), 1e-12) / losses[0])
