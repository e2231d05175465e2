"""Per-scalar features and the moving-average state."""

from __future__ import annotations

import pytest
import torch

from lopt import NeuralGraph
from lopt.optim.features import (
    ADAM_RATIO_FEATURE,
    FEATURE_NAMES,
    MOMENTUM_DECAYS,
    NUM_FEATURES,
    NUM_TIME_FEATURES,
    SECOND_MOMENT_DECAY,
    TIME_SCALES,
    init_feature_state,
    scalar_features,
    time_features,
    update_feature_state,
)

SHAPES = [(5, 3), (5,), (2, 5), (2,)]


def _setup(seed=0, steps=3):
    graph = NeuralGraph.from_shapes(SHAPES)
    gen = torch.Generator().manual_seed(seed)
    param = torch.randn(graph.num_scalars, generator=gen)
    state = init_feature_state(graph.num_scalars)
    # Scaled up so that the slow momenta stay well above the eps inside rsqrt.
    grads = [10 * torch.randn(graph.num_scalars, generator=gen) for _ in range(steps)]
    for g in grads:
        state = update_feature_state(state, g)
    return graph, param, grads, state


def test_state_is_float32_zero():
    state = init_feature_state(7)
    assert state.step.shape == () and float(state.step) == 0.0
    assert state.momenta.shape == (len(MOMENTUM_DECAYS), 7)
    assert state.second_moment.shape == (7,)
    assert all(t.dtype == torch.float32 and not t.any() for t in state)


def test_update_is_the_ema_of_gradients():
    _, _, grads, state = _setup()
    assert float(state.step) == 3.0
    for k, beta in enumerate(MOMENTUM_DECAYS):
        m = torch.zeros_like(grads[0])
        for g in grads:
            m = beta * m + (1 - beta) * g
        torch.testing.assert_close(state.momenta[k], m)
    v = torch.zeros_like(grads[0])
    for g in grads:
        v = SECOND_MOMENT_DECAY * v + (1 - SECOND_MOMENT_DECAY) * g * g
    torch.testing.assert_close(state.second_moment, v)


def test_features_shape_and_names():
    graph, param, grads, state = _setup()
    feats = scalar_features(graph, param, grads[-1], state)
    assert feats.shape == (NUM_FEATURES, graph.num_scalars)
    assert len(FEATURE_NAMES) == NUM_FEATURES
    assert FEATURE_NAMES[ADAM_RATIO_FEATURE] == "adam_ratio_0.9"


def test_normalised_features_have_unit_rms_per_tensor():
    graph, param, grads, state = _setup()
    feats = scalar_features(graph, param, grads[-1], state)
    for block in feats[:6].split(graph.numels, dim=1):
        rms = block.pow(2).mean(dim=1).sqrt()
        torch.testing.assert_close(rms, torch.ones(6), atol=1e-4, rtol=0)


def test_features_are_invariant_to_scale():
    graph, param, grads, _ = _setup()
    state, scaled = (
        init_feature_state(graph.num_scalars),
        init_feature_state(graph.num_scalars),
    )
    for g in grads:
        state = update_feature_state(state, g)
        scaled = update_feature_state(scaled, 10.0 * g)
    a = scalar_features(graph, param, grads[-1], state)
    b = scalar_features(graph, 10.0 * param, 10.0 * grads[-1], scaled)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_adam_ratio_at_first_step_is_sign_of_gradient():
    graph = NeuralGraph.from_shapes(SHAPES)
    grad = torch.randn(graph.num_scalars)
    state = update_feature_state(init_feature_state(graph.num_scalars), grad)
    feats = scalar_features(graph, torch.randn(graph.num_scalars), grad, state)
    torch.testing.assert_close(feats[ADAM_RATIO_FEATURE], grad.sign())


def test_zero_gradient_gives_finite_features_and_derivatives():
    graph = NeuralGraph.from_shapes(SHAPES)
    param = torch.zeros(graph.num_scalars, requires_grad=True)
    grad = torch.zeros(graph.num_scalars, requires_grad=True)
    state = update_feature_state(init_feature_state(graph.num_scalars), grad)
    feats = scalar_features(graph, param, grad, state)
    assert bool(torch.isfinite(feats).all())
    (dp, dg) = torch.autograd.grad(feats.sum(), (param, grad))
    assert bool(torch.isfinite(dp).all()) and bool(torch.isfinite(dg).all())


def test_time_features():
    t = time_features(torch.tensor(30.0))
    assert t.shape == (NUM_TIME_FEATURES,)
    expected = torch.tanh(torch.tensor([30.0 / tau - 1.0 for tau in TIME_SCALES]))
    torch.testing.assert_close(t, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_features_follow_the_state_dtype(dtype):
    graph, param, grads, state = _setup()
    state = type(state)(*(t.to(dtype) for t in state))
    new = update_feature_state(state, grads[0].to(dtype))
    assert all(t.dtype == dtype for t in new)
    feats = scalar_features(graph, param.to(dtype), grads[0].to(dtype), new)
    assert feats.dtype == dtype
    assert time_features(new.step).dtype == dtype
