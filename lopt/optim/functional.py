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
    init_feature_state,
    scalar_features,
    time_features,
    update_feature_state,
)
from lopt.optim.rule import RuleConfig, UpdateRule

__all__ = [
    "ng_step",
    "init_state",
    "flat_gradients",
    "adapt_step_sizes",
    "path_cosine",
    "next_log_step",
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


def adapt_step_sizes(
    config: RuleConfig,
    graph: NeuralGraph,
    params: torch.Tensor,
    grads: torch.Tensor,
    state: FeatureState,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The per-tensor step-size adaptation of a rule with
    ``config.step_adapt_rate > 0``: a hypergradient step on each tensor's log
    step multiplier ``s``.

    Moving the last steps' updates by a factor ``exp(ds)`` changes the loss by
    about ``ds * g . (p - trace)``, where ``p - trace`` is the tensor's recent
    path (the parameters minus an EMA of their past values: an EMA of the
    past updates). So ``s`` grows while the gradient keeps pointing along the
    path (steps too short) and shrinks when it points back (overshooting)::

        cos = -<g, p - trace> / (|g| |p - trace|)       per tensor
        s  <- clip(s + step_adapt_rate * cos, step_adapt_min, step_adapt_max)
        trace <- lerp(trace, p, 1 - step_adapt_decay)

    The cosine makes the rate free of the scales of gradients and weights.
    Before the first step (``state.trace`` empty) the trace starts at the
    parameters and ``s`` at zero, so the first step is the rule's own.

    Args:
        config: the rule's configuration.
        graph: the neural graph (``P`` scalars).
        params, grads: ``(P,)`` flat float32 vectors in graph order.
        state: the optimizer state before this step.

    With ``config.step_adapt_norm > 0`` the step of ``s`` is
    ``step_adapt_rate * m / sqrt(v)`` instead, where ``m`` and ``v`` are EMAs
    (decay ``step_adapt_norm``) of ``cos`` and ``cos^2``: the consistency of
    the cosine's sign, in [-1, 1]. Tensors without evidence this step (a
    cosine of exactly 0: negligible gradient or path) keep ``m``, ``v`` and
    ``s``. With ``config.step_adapt_spike > 0``, a tensor whose ``|g|^2``
    exceeds that many times its EMA (decay :data:`SPIKE_DECAY`) has ``s``
    cut by ``step_adapt_spike_cut`` and ``m`` reset to 0.

    Returns:
        ``(multiplier, trace, log_step, adapt_stats)``: the ``(P,)`` factor
        ``exp(s)`` of each scalar's update, and the new ``trace``,
        ``log_step`` and ``adapt_stats`` (see :func:`next_log_step`).
    """
    if not adaptation_started(config, graph, state):
        log_step = params.new_zeros(len(graph.numels))
        stats = initial_adapt_stats(config, len(graph.numels), params)
        return params.new_ones(params.shape), params.clone(), log_step, stats
    path = params - state.trace
    lengths = graph.segment_lengths.to(params.device)
    sums = torch.segment_reduce(
        torch.stack([grads * path, grads * grads, path * path]),
        "sum",
        lengths=lengths.expand(3, -1),
        axis=1,
    ).double()
    log_step, stats = next_log_step(
        config, state.log_step, sums[0], sums[1], sums[2], state.adapt_stats
    )
    trace = torch.lerp(state.trace, params, 1.0 - config.step_adapt_decay)
    by_tensor = torch.exp(log_step)[graph.tensor_position.to(params.device)]
    return by_tensor[graph.tensor_id.to(params.device)], trace, log_step, stats


#: Below this sum of squares (float32 squares of entries under about 1e-19
#: flush to zero) a tensor's gradient or path is treated as zero: its dot
#: product survives where its squares do not, and their ratio is garbage.
NEGLIGIBLE_SQUARES = 1e-30


def path_cosine(
    dot: torch.Tensor, grad_sq: torch.Tensor, path_sq: torch.Tensor
) -> torch.Tensor:
    """``-dot / (|g| |path|)`` per tensor (float64), within [-1, 1], and 0
    where the gradient or the path is negligible (:data:`NEGLIGIBLE_SQUARES`)
    so that vanishing gradients leave the step sizes alone."""
    cos = torch.clamp(-dot / (grad_sq.sqrt() * path_sq.sqrt() + 1e-300), -1.0, 1.0)
    live = (grad_sq > NEGLIGIBLE_SQUARES) & (path_sq > NEGLIGIBLE_SQUARES)
    return torch.where(live, cos, torch.zeros_like(cos))


def next_log_step(
    config: RuleConfig,
    log_step: torch.Tensor,
    dot: torch.Tensor,
    grad_sq: torch.Tensor,
    path_sq: torch.Tensor,
    adapt_stats: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The log step multipliers and the adaptation's statistics after one
    step, from the per-tensor sums ``<g, p - trace>``, ``|g|^2`` and
    ``|p - trace|^2`` (shared by the reference and the fused step).

    ``adapt_stats`` is ``(3, num tensors)`` (rows: EMAs of the cosine, of its
    square, and of ``|g|^2``) when ``config.adapt_stats_rows`` is 3, else
    empty; see :func:`adapt_step_sizes`."""
    cos = path_cosine(dot, grad_sq, path_sq).to(log_step.dtype)
    if not config.adapt_stats_rows:
        log_step = log_step + config.step_adapt_rate * cos
        return _clip_log_step(config, log_step), adapt_stats
    mean, square, grad_mean = adapt_stats.unbind()
    live = cos != 0  # no evidence this step: keep the moments and the step
    if config.step_adapt_norm > 0:
        rate = 1.0 - config.step_adapt_norm
        mean = torch.where(live, torch.lerp(mean, cos, rate), mean)
        square = torch.where(live, torch.lerp(square, cos * cos, rate), square)
        signal = torch.where(
            live & (square > 0), mean / square.clamp_min(1e-30).sqrt(), 0.0
        )
    else:
        signal = cos
    log_step = log_step + config.step_adapt_rate * signal
    if config.step_adapt_spike > 0:
        # |g|^2 of a finite gradient may exceed the float32 range: clamped, so
        # that the state stays finite (as the second moment's squares are).
        g2 = grad_sq.clamp(max=torch.finfo(log_step.dtype).max).to(log_step.dtype)
        fresh = grad_mean == 0  # first step: the mean starts at this gradient
        limit = config.step_adapt_spike * grad_mean
        spike = ~fresh & (g2 > limit)
        log_step = torch.where(spike, log_step - config.step_adapt_spike_cut, log_step)
        mean = torch.where(spike, 0.0, mean)  # growth restarts from no evidence
        # The EMA sees spikes clipped to the limit, so that a lasting change of
        # scale is caught up with in a few steps and a blow-up is not. Steps
        # without a gradient (zero loss, or none) decay it too, so the first
        # gradient after many of them counts as a spike: near zero loss that is
        # how blow-ups start.
        seen = torch.lerp(grad_mean, torch.minimum(g2, limit), 1.0 - SPIKE_DECAY)
        grad_mean = torch.where(fresh, g2, seen)
    return _clip_log_step(config, log_step), torch.stack([mean, square, grad_mean])


#: Decay of the EMA of each tensor's squared gradient norm that
#: ``RuleConfig.step_adapt_spike`` compares the current one with.
SPIKE_DECAY = 0.9


def _clip_log_step(config: RuleConfig, log_step: torch.Tensor) -> torch.Tensor:
    return torch.clamp(log_step, config.step_adapt_min, config.step_adapt_max)


def initial_adapt_stats(
    config: RuleConfig, num_tensors: int, like: torch.Tensor
) -> torch.Tensor:
    """``FeatureState.adapt_stats`` before the first step: zeros
    ``(config.adapt_stats_rows, num_tensors)``, or empty (float32, on
    ``like``'s device)."""
    rows = config.adapt_stats_rows
    shape = (rows, num_tensors) if rows else (0,)
    return torch.zeros(shape, dtype=torch.float32, device=like.device)


def adaptation_started(
    config: RuleConfig, graph: NeuralGraph, state: FeatureState
) -> bool:
    """Whether ``state`` holds the step-size adaptation's buffers for
    ``graph`` (after the first step of a rule that adapts its steps)."""
    tensors = len(graph.numels)
    return (
        state.trace.numel() == graph.num_scalars
        and state.log_step.numel() == tensors
        and state.adapt_stats.numel() == config.adapt_stats_rows * tensors
    )


def ng_step(
    rule: UpdateRule,
    graph: NeuralGraph,
    params: torch.Tensor,
    grads: torch.Tensor,
    state: FeatureState,
    lr: float | torch.Tensor = 1.0,
    weight_decay: float | torch.Tensor = 0.0,
    update_mask: torch.Tensor | None = None,
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
    if rule.config.adapts_steps:
        multiplier, trace, log_step, stats = adapt_step_sizes(
            rule.config, graph, params, grads, state
        )
        if update_mask is not None and adaptation_started(rule.config, graph, state):
            trace = torch.where(update_mask, trace, state.trace)
        new_state = new_state._replace(
            trace=trace, log_step=log_step, adapt_stats=stats
        )
        lr = lr * multiplier
    feats = scalar_features(graph, params, grads, new_state)
    update = rule(graph, feats, time_features(new_state.step))
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
