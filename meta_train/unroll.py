"""Truncated unrolls with persistent inner state.

An :class:`InnerState` is one task being trained by the learned optimizer: its
flat parameters and optimizer state persist across truncations, so a rule is
meta-trained on every phase of training (early, middle, late), not only on the
first ``T`` steps. Each truncation returns a meta-loss that is differentiable
in the rule's weights (truncated backprop through time).

The task is the shared :class:`~lopt.tasks.task.Task` (its batches and its
:meth:`~lopt.tasks.task.Task.functional_loss` at the flat parameters). The
loops here are not :mod:`lopt.tasks.loop`'s: they carry the rule's graph
across steps, add the task's gradient noise and measure divergence against
the task's loss at the start of its horizon.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import nn

from lopt.graph import NeuralGraph
from lopt.optim.features import FeatureState
from lopt.optim.functional import init_state, ng_step
from lopt.optim.rule import UpdateRule
from lopt.tasks.families import Task, TaskConfig, TaskFamily, _log_uniform, make_task

__all__ = [
    "InnerState",
    "new_inner_state",
    "advance_inner",
    "truncated_unroll",
    "LOSS_CAP",
]

#: Per-step meta-loss terms are capped at log(10): a diverging inner run then
#: gives a large but finite signal instead of an exploding meta-gradient.
LOSS_CAP = math.log(10.0)
#: Losses are floored at this fraction of the initial loss before the log: a
#: batch fitted to a loss of exactly 0 would otherwise give log(0) = -inf.
LOSS_FLOOR = 1e-6


@dataclass
class InnerState:
    """A task in the middle of its training by the learned optimizer."""

    config: TaskConfig
    task: Task
    model: nn.Module  # the task's model: its architecture, for functional_loss
    graph: NeuralGraph
    params: torch.Tensor  # (P,) flat, graph order, detached
    opt_state: FeatureState
    step: int  # inner steps done
    horizon: int  # inner steps before the task is replaced
    init_loss: float  # training loss at initialisation (normaliser)

    @property
    def done(self) -> bool:
        return self.step >= self.horizon


def new_inner_state(
    family: TaskFamily, generator: torch.Generator, horizon: tuple[int, int]
) -> InnerState:
    """Sample a task and a log-uniform horizon; start it at step 0."""
    config = family.sample(generator)
    return start_inner_state(
        config, round(_log_uniform(*horizon, generator)), generator
    )


def start_inner_state(
    config: TaskConfig, horizon: int, generator: torch.Generator
) -> InnerState:
    task = make_task(config)
    model = task.make_model(config.seed)
    init = [p.detach() for p in model.parameters()]
    graph = NeuralGraph.from_shapes([p.shape for p in init])
    params = graph.flatten(init)
    with torch.no_grad():
        batch = task.sample_batch(generator)
        init_loss = float(task.functional_loss(model, graph.unflatten(params), batch))
    return InnerState(
        config,
        task,
        model,
        graph,
        params,
        init_state(graph),
        0,
        horizon,
        max(init_loss, 1e-8),
    )


def _loss(
    inner: InnerState, params: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """The task's loss at the flat ``params`` on a batch drawn from ``generator``."""
    batch = inner.task.sample_batch(generator)
    return inner.task.functional_loss(inner.model, inner.graph.unflatten(params), batch)


def _inner_grad(inner: InnerState, loss: torch.Tensor, params: torch.Tensor, generator):
    grad = torch.autograd.grad(loss, params, retain_graph=True)[0].detach()
    noise = inner.config.grad_noise
    if noise > 0:
        rms = grad.pow(2).mean().sqrt()
        grad = grad + noise * rms * torch.randn(grad.shape, generator=generator)
    return grad


def _moved(
    inner: InnerState,
    params: torch.Tensor,
    opt_state: FeatureState,
    steps: int,
    extend_horizon: bool = False,
) -> InnerState:
    """``inner`` after ``steps`` more inner steps, detached (and with the
    horizon pushed back by as much when ``extend_horizon``)."""
    return replace(
        inner,
        params=params.detach(),
        opt_state=opt_state.detach(),
        step=inner.step + steps,
        horizon=inner.horizon + steps if extend_horizon else inner.horizon,
    )


def advance_inner(
    rule: UpdateRule, inner: InnerState, num_steps: int, generator: torch.Generator
) -> tuple[InnerState, bool]:
    """Train ``inner`` for ``num_steps`` steps with ``rule`` and no meta-gradient
    (the optimizer's no-grad fast path), extending its horizon by as much.

    Used to warm-start meta-training slots deep into training, so truncations
    also see the late phase of long runs without unrolling through the early
    one. Returns ``(new_inner_state, diverged)``; a diverged run (non-finite
    loss, or above ``exp(LOSS_CAP)`` = 10x the initial loss, where meta-loss
    terms saturate) stops early and leaves ``inner`` as it was.
    """
    params = inner.params.detach()
    opt_state = inner.opt_state
    for _ in range(num_steps):
        params = params.requires_grad_(True)
        loss = _loss(inner, params, generator)
        value = float(loss.detach())
        if not math.isfinite(value) or value > math.exp(LOSS_CAP) * inner.init_loss:
            return inner, True
        grad = _inner_grad(inner, loss, params, generator)
        with torch.no_grad():
            params, opt_state = ng_step(
                rule, inner.graph, params.detach(), grad, opt_state
            )
    return _moved(inner, params, opt_state, num_steps, extend_horizon=True), False


def truncated_unroll(
    rule: UpdateRule,
    inner: InnerState,
    num_steps: int,
    generator: torch.Generator,
    differentiable: bool = True,
) -> tuple[torch.Tensor, InnerState, bool]:
    """Run ``num_steps`` inner steps and return the meta-loss.

    The meta-loss is the mean over the truncation of ``log(L_t / L_0)`` (capped
    at :data:`LOSS_CAP`), where ``L_t`` is the training loss after ``t``
    updates and ``L_0`` the task's initial loss: scale-free across tasks.
    Gradients of the inner loss are treated as constants (first-order
    meta-gradient); the parameters carry the dependence on the rule from step
    to step.

    With ``differentiable=False`` (evolution strategies) the parameters are
    detached after every step, so no graph grows across the truncation.

    Returns:
        ``(meta_loss, new_inner_state, diverged)``; the new state is detached.
    """
    params = inner.params.requires_grad_(True)
    opt_state = inner.opt_state
    terms = []
    diverged = False
    for t in range(num_steps + 1):
        loss = _loss(inner, params, generator)
        if not torch.isfinite(loss):
            diverged = True
            break
        if t > 0:
            ratio = torch.clamp(loss / inner.init_loss, min=LOSS_FLOOR)
            terms.append(torch.clamp(torch.log(ratio), max=LOSS_CAP))
        if t == num_steps:
            break
        grad = _inner_grad(inner, loss, params, generator)
        params, opt_state = ng_step(rule, inner.graph, params, grad, opt_state)
        if not differentiable:
            params = params.detach().requires_grad_(True)
            opt_state = opt_state.detach()
    if not terms:
        return torch.zeros(()), inner, True
    meta_loss = torch.stack(terms).mean()
    return meta_loss, _moved(inner, params, opt_state, len(terms)), diverged
