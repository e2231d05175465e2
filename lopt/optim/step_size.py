"""Per-tensor step-size control: a controller that scales a rule's updates.

The controller is separate from the learned rule's architecture
(:class:`~lopt.optim.rule.RuleConfig`), the way a ``scale_by_*`` transform is
composed with an update in optax: it has its own settings
(:class:`StepSizeConfig`), its own state (the ``trace``, ``log_step`` and
``adapt_stats`` fields of :class:`~lopt.optim.features.FeatureState`) and its
own maths (:func:`adapt_step_sizes`, :func:`next_log_step`). A rule carries
the controller it was tuned with (``UpdateRule.step_size``, saved beside the
rule's config); the step multiplies each tensor's update by ``exp(s)``.

With the controller on, an untrained rule is Adam with a per-tensor learning
rate that tunes itself, and the learned corrections multiply a base that is
already near the right scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import torch

from lopt.graph import NeuralGraph
from lopt.optim.features import FeatureState

__all__ = [
    "StepSizeConfig",
    "adapt_step_sizes",
    "next_log_step",
    "path_cosine",
    "initial_adapt_stats",
    "adaptation_started",
    "split_legacy_fields",
    "LEGACY_FIELDS",
    "NEGLIGIBLE_SQUARES",
    "SPIKE_DECAY",
]


@dataclass(frozen=True)
class StepSizeConfig:
    """Settings of the per-tensor step-size controller (``rate = 0``: off).

    Each tensor's update is multiplied by ``exp(s)``, and every step ``s``
    moves by ``rate`` times the cosine between the negative gradient and the
    tensor's recent path (its value minus an EMA of its past values with decay
    ``decay``), within ``[log_min, log_max]``: a hypergradient on the log step.
    """

    rate: float = 0.0  # how far s moves per step (0: the controller is off)
    decay: float = 0.99  # decay of the EMA of past parameter values (the trace)
    log_min: float = -2.0  # s is kept within [log_min, log_max]
    log_max: float = 8.0
    # With norm > 0, s moves by rate times mean / RMS of the recent cosines
    # (EMAs with this decay) instead of the cosine itself: the sign's
    # consistency, not its size, sets the speed, so small but steady cosines
    # (noisy tensors) still move the step at the full rate, and noise alone
    # moves it little.
    norm: float = 0.0
    # With spike > 0, a tensor whose squared gradient norm exceeds spike times
    # its recent mean (an EMA) has s cut by spike_cut at once: a blow-up grows
    # faster than the cosine can shrink the step.
    spike: float = 0.0
    spike_cut: float = 2.0
    # With hold > 0, s below 0 (steps shorter than the rule's own) moves down
    # only on a signal below -hold: a consistent overshoot. A weaker negative
    # signal, which noise alone gives (the one-step hypergradient is biased
    # towards shrinking on noisy objectives), leaves it where it is; positive
    # signals and spike cuts act as usual. hold = 0: no dead zone.
    hold: float = 0.0

    @property
    def enabled(self) -> bool:
        """Whether the controller scales the updates at all."""
        return self.rate > 0

    @property
    def stats_rows(self) -> int:
        """Rows of per-tensor statistics the controller keeps
        (``FeatureState.adapt_stats``): 3 with ``norm`` or ``spike``, else 0."""
        return 3 if self.norm > 0 or self.spike > 0 else 0

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not (
                isinstance(value, (int, float)) and math.isfinite(value)
            ):
                raise ValueError(f"Invalid step_size.{f.name}: {value!r}")
        if self.rate < 0:
            raise ValueError(f"Invalid step_size.rate: {self.rate} (need >= 0)")
        if not 0.0 < self.decay < 1.0:
            raise ValueError(
                f"Invalid step_size.decay: {self.decay} (need 0 < decay < 1)"
            )
        if not 0.0 <= self.norm < 1.0:
            raise ValueError(
                f"Invalid step_size.norm: {self.norm} (need 0 <= decay < 1; 0 is off)"
            )
        if self.spike != 0.0 and self.spike <= 1.0:
            raise ValueError(
                f"Invalid step_size.spike: {self.spike} "
                "(need 0 for off, or a ratio > 1)"
            )
        if not 0.0 <= self.hold <= 1.0:
            raise ValueError(
                f"Invalid step_size.hold: {self.hold} (need 0 <= hold <= 1; 0 is off)"
            )
        if self.spike_cut < 0:
            raise ValueError(
                f"Invalid step_size.spike_cut: {self.spike_cut} (need >= 0)"
            )
        if not self.log_min <= 0.0 <= self.log_max:
            raise ValueError(
                f"Invalid step_size.log_min, step_size.log_max: {self.log_min}, "
                f"{self.log_max} (need min <= 0 <= max)"
            )


#: Fields that rule configs (rule files before format version 3, and
#: meta-training's ``rule`` overrides) carried for the controller ->
#: :class:`StepSizeConfig` fields.
LEGACY_FIELDS = {
    "step_adapt_rate": "rate",
    "step_adapt_decay": "decay",
    "step_adapt_min": "log_min",
    "step_adapt_max": "log_max",
    "step_adapt_norm": "norm",
    "step_adapt_spike": "spike",
    "step_adapt_spike_cut": "spike_cut",
}


def split_legacy_fields(
    rule_fields: dict[str, Any],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(rule fields, step-size fields)`` of a rule config dict that may
    still hold the controller's settings under their old ``step_adapt_*``
    names (see :data:`LEGACY_FIELDS`)."""
    rule = {k: v for k, v in rule_fields.items() if k not in LEGACY_FIELDS}
    step = {LEGACY_FIELDS[k]: v for k, v in rule_fields.items() if k in LEGACY_FIELDS}
    return rule, step


def adapt_step_sizes(
    config: StepSizeConfig,
    graph: NeuralGraph,
    params: torch.Tensor,
    grads: torch.Tensor,
    state: FeatureState,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step of the controller (``config.enabled``): a hypergradient step
    on each tensor's log step multiplier ``s``.

    Moving the last steps' updates by a factor ``exp(ds)`` changes the loss by
    about ``ds * g . (p - trace)``, where ``p - trace`` is the tensor's recent
    path (the parameters minus an EMA of their past values: an EMA of the
    past updates). So ``s`` grows while the gradient keeps pointing along the
    path (steps too short) and shrinks when it points back (overshooting)::

        cos = -<g, p - trace> / (|g| |p - trace|)       per tensor
        s  <- clip(s + rate * cos, log_min, log_max)
        trace <- lerp(trace, p, 1 - decay)

    The cosine makes the rate free of the scales of gradients and weights.
    Before the first step (``state.trace`` empty) the trace starts at the
    parameters and ``s`` at zero, so the first step is the rule's own.

    Args:
        config: the controller's settings.
        graph: the neural graph (``P`` scalars).
        params, grads: ``(P,)`` flat float32 vectors in graph order.
        state: the optimizer state before this step.

    With ``config.norm > 0`` the step of ``s`` is
    ``rate * m / sqrt(v)`` instead, where ``m`` and ``v`` are EMAs
    (decay ``norm``) of ``cos`` and ``cos^2``: the consistency of
    the cosine's sign, in [-1, 1]. Tensors without evidence this step (a
    cosine of exactly 0: negligible gradient or path) keep ``m``, ``v`` and
    ``s``. With ``config.spike > 0``, a tensor whose ``|g|^2``
    exceeds that many times its EMA (decay :data:`SPIKE_DECAY`) has ``s``
    cut by ``spike_cut`` and ``m`` reset to 0.

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
    trace = torch.lerp(state.trace, params, 1.0 - config.decay)
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
    config: StepSizeConfig,
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
    square, and of ``|g|^2``) when ``config.stats_rows`` is 3, else
    empty; see :func:`adapt_step_sizes`."""
    cos = path_cosine(dot, grad_sq, path_sq).to(log_step.dtype)
    if not config.stats_rows:
        log_step = _move(config, log_step, cos)
        return _clip_log_step(config, log_step), adapt_stats
    mean, square, grad_mean = adapt_stats.unbind()
    live = cos != 0  # no evidence this step: keep the moments and the step
    if config.norm > 0:
        rate = 1.0 - config.norm
        mean = torch.where(live, torch.lerp(mean, cos, rate), mean)
        square = torch.where(live, torch.lerp(square, cos * cos, rate), square)
        signal = torch.where(
            live & (square > 0), mean / square.clamp_min(1e-30).sqrt(), 0.0
        )
    else:
        signal = cos
    log_step = _move(config, log_step, signal)
    if config.spike > 0:
        # |g|^2 of a finite gradient may exceed the float32 range: clamped, so
        # that the state stays finite (as the second moment's squares are).
        g2 = grad_sq.clamp(max=torch.finfo(log_step.dtype).max).to(log_step.dtype)
        fresh = grad_mean == 0  # first step: the mean starts at this gradient
        limit = config.spike * grad_mean
        spike = ~fresh & (g2 > limit)
        log_step = torch.where(spike, log_step - config.spike_cut, log_step)
        mean = torch.where(spike, 0.0, mean)  # growth restarts from no evidence
        # The EMA sees spikes clipped to the limit, so that a lasting change of
        # scale is caught up with in a few steps and a blow-up is not. Steps
        # without a gradient (zero loss, or none) decay it too, so the first
        # gradient after many of them counts as a spike: near zero loss that is
        # how blow-ups start.
        seen = torch.lerp(grad_mean, torch.minimum(g2, limit), 1.0 - SPIKE_DECAY)
        grad_mean = torch.where(fresh, g2, seen)
    return _clip_log_step(config, log_step), torch.stack([mean, square, grad_mean])


def _move(
    config: StepSizeConfig, log_step: torch.Tensor, signal: torch.Tensor
) -> torch.Tensor:
    """``log_step + rate * signal``, except that with ``config.hold`` a
    signal above ``-hold`` takes no log step below 0, nor further down once
    there (see :class:`StepSizeConfig`)."""
    moved = log_step + config.rate * signal
    if config.hold > 0:
        held = (moved < 0) & (signal > -config.hold)
        moved = torch.where(held, torch.maximum(moved, log_step.clamp(max=0)), moved)
    return moved


#: Decay of the EMA of each tensor's squared gradient norm that
#: ``StepSizeConfig.spike`` compares the current one with.
SPIKE_DECAY = 0.9


def _clip_log_step(config: StepSizeConfig, log_step: torch.Tensor) -> torch.Tensor:
    return torch.clamp(log_step, config.log_min, config.log_max)


def initial_adapt_stats(
    config: StepSizeConfig, num_tensors: int, like: torch.Tensor
) -> torch.Tensor:
    """``FeatureState.adapt_stats`` before the first step: zeros
    ``(config.stats_rows, num_tensors)``, or empty (float32, on
    ``like``'s device)."""
    rows = config.stats_rows
    shape = (rows, num_tensors) if rows else (0,)
    return torch.zeros(shape, dtype=torch.float32, device=like.device)


def adaptation_started(
    config: StepSizeConfig, graph: NeuralGraph, state: FeatureState
) -> bool:
    """Whether ``state`` holds the step-size adaptation's buffers for
    ``graph`` (after the first step of a rule that adapts its steps)."""
    tensors = len(graph.numels)
    return (
        state.trace.numel() == graph.num_scalars
        and state.log_step.numel() == tensors
        and state.adapt_stats.numel() == config.stats_rows * tensors
    )
