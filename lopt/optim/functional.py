"""The pure learned-optimizer step: the single source of truth.

:func:`ng_step` maps ``(rule, graph, params, grads, state)`` to
``(new_params, new_state)`` on flat float32 vectors and changes nothing in
place. :class:`~lopt.optim.optimizer.NGOptimizer` calls it under ``torch.no_grad()``;
meta-training and the ``higher`` integration call it with autograd on, so the
result is differentiable in the rule's weights (and, optionally, through the
parameters and gradients).
"""

from __future__ import annotations

import torch

from lopt.graph import NeuralGraph
from lopt.optim.features import (
    FeatureState,
    adam_ratio,
    init_feature_state,
    scalar_features,
    time_features,
    update_feature_state,
)
from lopt.optim.orthogonal import OrthoPlan, orthogonalize_flat
from lopt.optim.rule import UpdateRule
from lopt.optim.step_size import adapt_step_sizes, adaptation_started

__all__ = [
    "ng_step",
    "init_state",
    "flat_gradients",
    "FeatureState",
]


def init_state(
    graph: NeuralGraph, device: torch.device | str | None = None
) -> FeatureState:
    """Zero optimizer state for every scalar of ``graph``."""
    return init_feature_state(graph.num_scalars, device)


def flat_gradients(
    graph: NeuralGraph,
    params: list[torch.Tensor],
    grads: list[torch.Tensor | None],
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gradients as one flat float32 vector in graph order.

    ``None`` gradients count as zeros; the returned mask (``None`` when every
    parameter has a gradient) marks the scalars that had one, for
    :func:`ng_step`'s ``update_mask``.
    """
    has_grad = [g is not None for g in grads]
    if all(has_grad):
        return graph.flatten(grads), None
    filled = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
    return graph.flatten(filled), graph.per_scalar(has_grad, torch.bool)


def ng_step(
    rule: UpdateRule,
    graph: NeuralGraph,
    params: torch.Tensor,
    grads: torch.Tensor,
    state: FeatureState,
    lr: float | torch.Tensor = 1.0,
    weight_decay: float | torch.Tensor = 0.0,
    update_mask: torch.Tensor | None = None,
    ortho: OrthoPlan | None = None,
) -> tuple[torch.Tensor, FeatureState]:
    """One learned-optimizer step on flat vectors.

    Args:
        rule: the update rule.
        graph: the neural graph of the parameters (``P`` scalars).
        params: ``(P,)`` float32 parameter values.
        grads: ``(P,)`` float32 gradients.
        state: the optimizer state before this step.
        lr: multiplier of the rule's step, a float or a ``(P,)`` tensor (one
            value per scalar, for several param groups).
        weight_decay: decoupled weight decay, scaled like AdamW's:
            ``p -= lr * rule.config.step_scale * weight_decay * p``.
        update_mask: optional ``(P,)`` bool; scalars where it is ``False`` keep
            their value and their state (parameters that had no gradient).
        ortho: hidden matrices whose updates are orthogonalised (see
            :mod:`lopt.optim.orthogonal`); ``None``: none.

    Returns:
        ``(new_params, new_state)``.
    """
    new_state = update_feature_state(state, grads)
    if update_mask is not None:
        new_state = new_state._replace(
            momenta=torch.where(update_mask, new_state.momenta, state.momenta),
            second_moment=torch.where(
                update_mask, new_state.second_moment, state.second_moment
            ),
        )
    if params.numel() == 0:  # only empty tensors: nothing to update
        return params.clone(), new_state
    if rule.step_size.enabled:
        multiplier, trace, log_step, stats = adapt_step_sizes(
            rule.step_size, graph, params, grads, state
        )
        if update_mask is not None and adaptation_started(rule.step_size, graph, state):
            trace = torch.where(update_mask, trace, state.trace)
        new_state = new_state._replace(
            trace=trace, log_step=log_step, adapt_stats=stats
        )
        lr = lr * multiplier
    if not torch.is_grad_enabled() and rule.learned_output_is_zero:
        # A fresh rule (the base rule): its update is -step_scale times the
        # Adam ratio whatever the graph network computes, so it is skipped.
        # With autograd on (meta-training) the network runs: its weights
        # need their gradients.
        update = adam_ratio(new_state).mul_(-rule.config.step_scale)
    else:
        feats = scalar_features(graph, params, grads, new_state)
        update = rule(graph, feats, time_features(new_state.step))
    if ortho:
        update = orthogonalize_flat(update, ortho)
    # ``params + lr * (update - decay)``; without autograd in place in the
    # rule's fresh output (the same operations, one buffer).
    inplace = not torch.is_grad_enabled()
    if isinstance(weight_decay, torch.Tensor) or weight_decay != 0.0:
        decay = rule.config.step_scale * weight_decay * params
        update = update.sub_(decay) if inplace else update - decay
    if isinstance(lr, torch.Tensor) or lr != 1.0:
        update = update.mul_(lr) if inplace else lr * update
    new_params = update.add_(params) if inplace else params + update
    if update_mask is not None:
        new_params = torch.where(update_mask, new_params, params)
    return new_params, new_state
