"""The pure step: purity, masks, lr and weight decay, and gradcheck."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import mlp, random_rule
from torch import nn

from lopt import FeatureState, NeuralGraph, RuleConfig, init_state, ng_step

SHAPES = [(3, 2), (3,), (2, 3), (2,)]


def _setup(seed=0):
    graph = NeuralGraph.from_shapes(SHAPES)
    gen = torch.Generator().manual_seed(seed)
    params = torch.randn(graph.num_scalars, generator=gen)
    grads = torch.randn(graph.num_scalars, generator=gen)
    return graph, params, grads


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
def test_step_is_pure(grad):
    rule = random_rule()
    graph, params, grads = _setup()
    state = init_state(graph)
    copies = (params.clone(), grads.clone(), [t.clone() for t in state])
    with torch.set_grad_enabled(grad):  # no_grad takes the in-place paths
        new_params, new_state = ng_step(rule, graph, params, grads, state)
    assert torch.equal(params, copies[0]) and torch.equal(grads, copies[1])
    assert all(torch.equal(a, b) for a, b in zip(state, copies[2]))
    assert not torch.equal(new_params, params)
    assert float(new_state.step) == 1.0
    again, _ = ng_step(rule, graph, params, grads, state)
    assert torch.equal(again, new_params)


_MODELS = {
    "mlp": lambda: mlp(sizes=(5, 7, 7, 3)),
    "cnn": lambda: nn.Sequential(
        nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 3, 3), nn.Linear(12, 2)
    ),
    "transformer": lambda: nn.TransformerEncoderLayer(
        d_model=8, nhead=2, dim_feedforward=16
    ),
}


@pytest.mark.parametrize("name", sorted(_MODELS))
def test_no_grad_step_equals_autograd_step(name):
    """Without autograd (NGOptimizer) ng_step writes features into one
    buffer, reuses dead buffers, works in place and sums dst-sorted edges by
    segments; with autograd (meta-training) it does none of that. Both must
    compute the same step, with lr tensors, weight decay and masks."""
    torch.manual_seed(0)
    graph = NeuralGraph.from_parameters(list(_MODELS[name]().parameters()))
    assert graph.degree.dst_sorted  # graphs from shapes: the segment path
    config = RuleConfig(
        node_dim=8, edge_dim=4, num_layers=2, head_hidden=4, degree_features=True
    )
    rule = random_rule(seed=3, config=config)
    gen = torch.Generator().manual_seed(0)
    params = torch.randn(graph.num_scalars, generator=gen)
    state = init_state(graph)
    for step in range(3):
        grads = torch.randn(graph.num_scalars, generator=gen) * 10.0**-step
        lr = 0.5 if step == 0 else torch.rand(graph.num_scalars, generator=gen)
        mask = None if step < 2 else torch.rand(graph.num_scalars, generator=gen) > 0.3
        args = (rule, graph, params, grads, state, lr, 0.1 * step, mask)
        with torch.no_grad():
            fast, fast_state = ng_step(*args)
        slow, slow_state = ng_step(*args)
        assert slow.requires_grad and not fast.requires_grad
        torch.testing.assert_close(fast, slow.detach())
        for a, b in zip(fast_state, slow_state):
            torch.testing.assert_close(a, b)
        params, state = fast, fast_state


def test_update_mask_freezes_params_and_state():
    rule = random_rule()
    graph, params, grads = _setup()
    state = ng_step(rule, graph, params, grads, init_state(graph))[1]
    mask = torch.zeros(graph.num_scalars, dtype=torch.bool)
    mask[::2] = True
    new_params, new_state = ng_step(rule, graph, params, grads, state, update_mask=mask)
    assert torch.equal(new_params[~mask], params[~mask])
    assert bool((new_params[mask] != params[mask]).all())
    assert torch.equal(new_state.momenta[:, ~mask], state.momenta[:, ~mask])
    assert torch.equal(new_state.second_moment[~mask], state.second_moment[~mask])
    assert not torch.equal(new_state.momenta[:, mask], state.momenta[:, mask])


def test_update_is_linear_in_lr():
    rule = random_rule()
    graph, params, grads = _setup()
    state = init_state(graph)
    full, _ = ng_step(rule, graph, params, grads, state, lr=1.0)
    half, _ = ng_step(rule, graph, params, grads, state, lr=0.5)
    torch.testing.assert_close(half - params, 0.5 * (full - params))


def test_per_scalar_lr_tensor_equals_float():
    rule = random_rule()
    graph, params, grads = _setup()
    state = init_state(graph)
    a, _ = ng_step(rule, graph, params, grads, state, lr=0.3)
    lr = torch.full((graph.num_scalars,), 0.3)
    b, _ = ng_step(rule, graph, params, grads, state, lr=lr)
    torch.testing.assert_close(a, b)
    lr[:6] = 0.0
    c, _ = ng_step(rule, graph, params, grads, state, lr=lr)
    assert torch.equal(c[:6], params[:6])


def test_weight_decay_is_decoupled():
    rule = random_rule()
    graph, params, grads = _setup()
    state = init_state(graph)
    plain, _ = ng_step(rule, graph, params, grads, state, lr=0.5)
    decayed, _ = ng_step(rule, graph, params, grads, state, lr=0.5, weight_decay=0.1)
    expected = plain - 0.5 * rule.config.step_scale * 0.1 * params
    torch.testing.assert_close(decayed, expected)


def _double(rule, graph, state):
    rule = rule.double()
    kernel_attr = None if graph.kernel_attr is None else graph.kernel_attr.double()
    graph = dataclasses.replace(
        graph, kernel_attr=kernel_attr, node_attr=graph.node_attr.double()
    )
    return rule, graph, FeatureState(*(t.double() for t in state))


class _WithWeights:
    """``rule`` with some of its weights replaced (for ``gradcheck`` inputs)."""

    def __init__(self, rule, names, weights):
        self.rule, self.config, self.step_size = rule, rule.config, rule.step_size
        self.weights = dict(zip(names, weights))

    def __call__(self, *args):
        return torch.func.functional_call(self.rule, self.weights, args)


def test_gradcheck_in_rule_weights():
    config = RuleConfig(node_dim=4, edge_dim=2, num_layers=1, head_hidden=3)
    rule = random_rule(seed=1, config=config)
    graph, params, grads = _setup()
    # Start from a non-zero state so that every feature is non-trivial.
    state = ng_step(rule, graph, params, 0.5 * grads, init_state(graph))[1]
    rule, graph, state = _double(rule, graph, state)
    params, grads = params.double(), grads.double()
    names = [
        "edge_head.out.weight",
        "slot_head.skip.weight",
        "backbone.layers.0.film.weight",
        "backbone.edge_encoder.weight",
    ]
    weights = [rule.get_parameter(n).detach().clone().requires_grad_() for n in names]

    def step(*weights):
        new_params, new_state = ng_step(
            _WithWeights(rule, names, weights), graph, params, grads, state, lr=100.0
        )
        return new_params

    assert torch.autograd.gradcheck(step, weights, eps=1e-6, atol=1e-6, rtol=1e-4)


def test_gradcheck_in_params_and_grads():
    config = RuleConfig(node_dim=4, edge_dim=2, num_layers=1, head_hidden=3)
    rule = random_rule(seed=2, config=config)
    graph, params, grads = _setup(seed=1)
    state = ng_step(rule, graph, params, grads, init_state(graph))[1]
    rule, graph, state = _double(rule, graph, state)

    def step(p, g):
        return ng_step(rule, graph, p, g, state, lr=100.0)[0]

    inputs = (params.double().requires_grad_(), grads.double().requires_grad_())
    assert torch.autograd.gradcheck(step, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)
