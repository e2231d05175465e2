"""Run a rule (or Adam) on one task and record its training-loss curve: shared by
the validation inside meta-training and by ``meta_train.select``."""

from __future__ import annotations

import math

import torch

from lopt.functional import init_state, ng_step
from lopt.graph import NeuralGraph
from lopt.rule import UpdateRule
from meta_train.tasks import TaskConfig, make_task

__all__ = ["loss_curve", "final_log_ratio", "DIVERGED_SCORE"]

#: Score of a diverged run in :func:`final_log_ratio`: a loss 10x its start.
DIVERGED_SCORE = math.log(10.0)


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
    task = make_task(config)
    gen = torch.Generator().manual_seed(config.seed)
    params = [p.clone() for p in task.init_params]
    graph = NeuralGraph.from_shapes([p.shape for p in params])
    flat, state = graph.flatten(params), init_state(graph)
    adam = None
    if rule is None:
        params = [p.requires_grad_(True) for p in params]
        adam = torch.optim.Adam(params, lr=1e-3)
    losses: list[float] = []
    for _ in range(steps):
        x, y = task.batch(gen)
        with torch.enable_grad():
            current = (
                params
                if adam
                else [p.requires_grad_(True) for p in graph.unflatten(flat.clone())]
            )
            loss = task.loss(current, x, y)
            grads = torch.autograd.grad(loss, current)
        value = float(loss)
        if not math.isfinite(value):
            losses.append(math.inf)
            return losses, True
        losses.append(value)
        if stop_above is not None and value > stop_above * losses[0]:
            return losses, True
        if adam:
            for p, g in zip(params, grads):
                p.grad = g
            adam.step()
        else:
            flat, state = ng_step(rule, graph, flat, graph.flatten(grads), state)
    return losses, False


def final_log_ratio(losses: list[float], diverged: bool) -> float:
    """``log(L_final / L_0)`` with ``L_final`` the mean of the last 10% of the
    losses; a diverged run scores :data:`DIVERGED_SCORE` (lower is better)."""
    if diverged:
        return DIVERGED_SCORE
    tail = losses[-max(1, len(losses) // 10) :]
    return math.log(max(sum(tail) / len(tail), 1e-12) / losses[0])
