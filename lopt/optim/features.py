"""Per-scalar optimizer features and the optimizer state they are built from.

Everything here works on flat float32 vectors over all ``P`` scalars of a
:class:`~lopt.graph.NeuralGraph`, whatever the parameters' dtype. The state is
an immutable :class:`FeatureState` so that the same code serves the in-place
optimizer (under ``torch.no_grad``) and meta-training (autograd through the
unroll).

Features of each scalar, in column order (:data:`FEATURE_NAMES`):

* parameter value, gradient and momenta at the decays :data:`MOMENTUM_DECAYS`,
  each divided by its per-tensor root-mean-square, so the rule sees shapes of
  distributions, not scales (a network multiplied by 10 looks the same);
* Adam-style ratios ``m_hat / sqrt(v_hat + eps)`` per momentum decay. They are
  already scale-free and bounded (about [-1, 1]), and their magnitude carries
  the signal-to-noise ratio of the gradient, so they are not re-normalised.

Time features ``tanh(t / tau - 1)`` on a log grid of ``tau`` are shared by all
scalars and returned separately (:func:`time_features`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from lopt.graph import NeuralGraph

__all__ = [
    "FeatureState",
    "MOMENTUM_DECAYS",
    "SECOND_MOMENT_DECAY",
    "TIME_SCALES",
    "FEATURE_NAMES",
    "NUM_FEATURES",
    "NUM_TIME_FEATURES",
    "ADAM_RATIO_FEATURE",
    "init_feature_state",
    "update_feature_state",
    "scalar_features",
    "adam_ratio",
    "time_features",
]

MOMENTUM_DECAYS = (0.5, 0.9, 0.99, 0.999)
SECOND_MOMENT_DECAY = 0.999
TIME_SCALES = (3.0, 30.0, 300.0, 3000.0, 30000.0)
EPS = 1e-8
#: eps inside sqrt of the second moment, as in Adam (and keeps 2nd derivatives finite)
RATIO_EPS = 1e-16

FEATURE_NAMES = (
    ("param", "grad")
    + tuple(f"mom_{b}" for b in MOMENTUM_DECAYS)
    + tuple(f"adam_ratio_{b}" for b in MOMENTUM_DECAYS)
)
NUM_FEATURES = len(FEATURE_NAMES)
NUM_TIME_FEATURES = len(TIME_SCALES)
#: Column of the Adam ratio with beta1 = 0.9: the rule is initialised to follow it.
ADAM_RATIO_FEATURE = FEATURE_NAMES.index("adam_ratio_0.9")
_NUM_NORMALISED = 2 + len(MOMENTUM_DECAYS)


#: Stands for the step-size adaptation's state where there is none yet.
_EMPTY = torch.zeros(0)


class FeatureState(NamedTuple):
    """Optimizer state over the flat parameter vector (all float32).

    ``trace``, ``log_step`` and ``adapt_stats`` are the state of the
    per-tensor step-size controller of rules that have it on
    (:class:`lopt.optim.step_size.StepSizeConfig`, see
    :func:`lopt.optim.step_size.adapt_step_sizes`); they are empty (``(0,)``)
    for rules without it and before the first step of rules with it, and
    ``adapt_stats`` also for controllers with neither ``norm`` nor ``spike``.
    """

    step: torch.Tensor  # () number of updates applied so far
    momenta: torch.Tensor  # (len(MOMENTUM_DECAYS), P) gradient EMAs
    second_moment: torch.Tensor  # (P,) EMA of squared gradients
    trace: torch.Tensor = _EMPTY  # (P,) EMA of past parameter values
    log_step: torch.Tensor = _EMPTY  # (num tensors,) log step multipliers
    adapt_stats: torch.Tensor = _EMPTY  # (3, num tensors): see next_log_step

    def map(self, fn) -> FeatureState:
        """The state with ``fn`` applied to each tensor."""
        return FeatureState(*(fn(t) for t in self))

    def detach(self) -> FeatureState:
        """The state with every tensor detached from autograd."""
        return self.map(torch.Tensor.detach)


def init_feature_state(
    num_scalars: int, device: torch.device | str | None = None
) -> FeatureState:
    """Zero state for ``num_scalars`` parameters."""
    return FeatureState(
        step=torch.zeros((), device=device),
        momenta=torch.zeros(len(MOMENTUM_DECAYS), num_scalars, device=device),
        second_moment=torch.zeros(num_scalars, device=device),
        trace=torch.zeros(0, device=device),
        log_step=torch.zeros(0, device=device),
        adapt_stats=torch.zeros(0, device=device),
    )


def _decays(like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(MOMENTUM_DECAYS, device=like.device, dtype=like.dtype)[:, None]


def update_feature_state(state: FeatureState, grad: torch.Tensor) -> FeatureState:
    """Fold one gradient ``(P,)`` into the moving averages.

    The square of a finite gradient above about 1.8e19 overflows float32: it is
    clamped to the largest finite value, so that the second moment stays finite
    (an infinite one makes the next step's ``lerp`` compute ``inf - inf``, and
    the NaN reaches the parameters).
    """
    betas = _decays(state.momenta)
    momenta = torch.lerp(state.momenta, grad.expand_as(state.momenta), 1.0 - betas)
    square = torch.clamp(grad * grad, max=torch.finfo(grad.dtype).max)
    second = torch.lerp(state.second_moment, square, 1.0 - SECOND_MOMENT_DECAY)
    return state._replace(step=state.step + 1, momenta=momenta, second_moment=second)


def _inverse_rms(graph: NeuralGraph, squares: torch.Tensor) -> torch.Tensor:
    """``1 / sqrt(mean + EPS)`` of each row of ``squares (C, P)`` within each
    tensor, ``(C, num tensors)`` in graph order: computed per tensor, expanded
    by the caller."""
    lengths = graph.segment_lengths.to(squares.device)
    mean_sq = torch.segment_reduce(
        squares, "mean", lengths=lengths.expand(len(squares), -1), axis=1
    )
    return torch.rsqrt(mean_sq + EPS)


def scalar_features(
    graph: NeuralGraph, param: torch.Tensor, grad: torch.Tensor, state: FeatureState
) -> torch.Tensor:
    """Features ``(NUM_FEATURES, P)`` of every scalar (channel-major).

    ``state`` must already include ``grad`` (see :func:`update_feature_state`),
    so that the ratios at step 1 are well defined.
    """
    t = state.step
    total = param.shape[-1]
    m_scale = 1.0 - _decays(state.momenta) ** t
    v_hat = state.second_moment / (1.0 - SECOND_MOMENT_DECAY**t)
    if torch.is_grad_enabled():
        raw = torch.cat([param[None], grad[None], state.momenta], dim=0)
        scale = torch.repeat_interleave(
            _inverse_rms(graph, raw * raw),
            graph.segment_lengths.to(raw.device),
            dim=1,
            output_size=total,
        )
        ratios = state.momenta / m_scale * torch.rsqrt(v_hat + RATIO_EPS)
        return torch.cat([raw * scale, ratios], dim=0)
    # Without autograd the same operations write into one buffer (no
    # concatenations), temporaries are reused, and the per-tensor scales are
    # expanded by gathering them per scalar (tensor_id) into the dead buffer
    # of squares instead of repeat_interleave into a new one.
    dtype = torch.promote_types(
        torch.promote_types(param.dtype, grad.dtype), state.momenta.dtype
    )
    feats = torch.empty(NUM_FEATURES, total, dtype=dtype, device=param.device)
    raw, ratios = feats[:_NUM_NORMALISED], feats[_NUM_NORMALISED:]
    raw[0], raw[1], raw[2:] = param, grad, state.momenta
    squares = raw * raw
    by_tensor = _inverse_rms(graph, squares)[:, graph.tensor_position]
    raw.mul_(torch.index_select(by_tensor, 1, graph.tensor_id, out=squares))
    del squares
    torch.div(state.momenta, m_scale, out=ratios)
    ratios.mul_(v_hat.add_(RATIO_EPS).rsqrt_())
    return feats


def adam_ratio(state: FeatureState) -> torch.Tensor:
    """The Adam ratio ``m_hat / sqrt(v_hat)`` with beta1 = 0.9, ``(P,)``:
    feature ``adam_ratio_0.9`` of :func:`scalar_features`, computed alone
    with the same operations (so to the same bits)."""
    k = MOMENTUM_DECAYS.index(0.9)
    t = state.step
    m_scale = 1.0 - _decays(state.momenta)[k] ** t
    v_hat = state.second_moment / (1.0 - SECOND_MOMENT_DECAY**t)
    return state.momenta[k] / m_scale * torch.rsqrt(v_hat + RATIO_EPS)


def time_features(step: torch.Tensor) -> torch.Tensor:
    """``tanh(t / tau - 1)`` for each time scale, shape ``(NUM_TIME_FEATURES,)``."""
    taus = torch.tensor(TIME_SCALES, device=step.device, dtype=step.dtype)
    return torch.tanh(step / taus - 1.0)
