"""The higher integration: same trajectory as NGOptimizer, same meta-gradients
as an unroll written directly on ng_step."""

from __future__ import annotations

import copy
import subprocess
import sys

import higher
import pytest
import torch
from conftest import mlp, random_rule, regression_data
from torch import nn

from lopt import (
    DifferentiableNGOptimizer,
    NeuralGraph,
    NGOptimizer,
    init_state,
    ng_step,
)


def _loss(model, x, y):
    return nn.functional.mse_loss(model(x), y)


def test_importing_the_integration_registers_with_higher():
    # ``import lopt`` alone leaves higher alone (not even imported); importing
    # the integration registers NGOptimizer's differentiable counterpart.
    code = (
        "import sys, lopt; assert 'higher' not in sys.modules; "
        "import higher.optim as o; assert lopt.NGOptimizer not in o._opt_mapping; "
        "import lopt.integrations.higher as h; "
        "assert o._opt_mapping[lopt.NGOptimizer] is h.DifferentiableNGOptimizer; "
        "assert lopt.DifferentiableNGOptimizer is h.DifferentiableNGOptimizer"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_innerloop_follows_ngoptimizer_trajectory():
    x, y = regression_data()
    rule = random_rule(seed=1)
    model = mlp()
    reference = copy.deepcopy(model)
    ref_opt = NGOptimizer(reference.parameters(), rule=rule, weight_decay=0.1)
    opt = NGOptimizer(model.parameters(), rule=rule, weight_decay=0.1)
    with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
        assert isinstance(diffopt, DifferentiableNGOptimizer)
        assert diffopt.rule is rule
        for _ in range(3):
            diffopt.step(_loss(fmodel, x, y))
            ref_opt.zero_grad()
            _loss(reference, x, y).backward()
            ref_opt.step()
        for fast, p in zip(fmodel.parameters(), reference.parameters()):
            assert fast.grad_fn is not None
            torch.testing.assert_close(fast, p, atol=1e-6, rtol=1e-5)
        for i, p in enumerate(reference.parameters()):
            torch.testing.assert_close(
                diffopt.state[0][i]["momenta"], ref_opt.state[p]["momenta"]
            )
        assert float(diffopt.ng_state.step) == 3.0
    # The original model is not touched by the inner loop.
    untouched = zip(model.parameters(), mlp().parameters())
    assert all(torch.equal(a, b) for a, b in untouched)


def test_innerloop_continues_from_optimizer_state():
    x, y = regression_data()
    rule = random_rule(seed=2)
    model = mlp()
    opt = NGOptimizer(model.parameters(), rule=rule)
    for _ in range(2):
        opt.zero_grad()
        _loss(model, x, y).backward()
        opt.step()
    reference = copy.deepcopy(model)
    ref_opt = NGOptimizer(reference.parameters(), rule=rule)
    ref_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
        diffopt.step(_loss(fmodel, x, y))
        fast = [p.detach().clone() for p in fmodel.parameters()]
    # The copy of the state is detached: the original optimizer is unchanged.
    assert float(opt.state[model[0].weight]["step"]) == 2.0
    ref_opt.zero_grad()
    _loss(reference, x, y).backward()
    ref_opt.step()
    for a, b in zip(fast, reference.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


class _WithUnused(nn.Module):
    """An MLP plus a layer its forward never uses."""

    def __init__(self):
        super().__init__()
        self.body = mlp()
        self.unused = nn.Linear(2, 2)

    def forward(self, x):
        return self.body(x)


def test_innerloop_with_param_groups_and_unused_params():
    x, y = regression_data()
    rule = random_rule(seed=3)
    model = _WithUnused()
    reference = copy.deepcopy(model)

    def groups(m):
        return [
            {"params": m.body[0].parameters(), "lr": 0.5},
            {"params": [*m.body[2].parameters(), *m.unused.parameters()]},
        ]

    ref_opt = NGOptimizer(groups(reference), rule=rule)
    opt = NGOptimizer(groups(model), rule=rule)
    with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
        for _ in range(2):
            diffopt.step(_loss(fmodel, x, y))
            ref_opt.zero_grad()
            _loss(reference, x, y).backward()
            ref_opt.step()
        fast = list(fmodel.parameters())
    for a, b in zip(fast, reference.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    # Parameters the loss does not use keep their exact values.
    for a, b in zip(fast[-2:], model.unused.parameters()):
        assert torch.equal(a, b)
    # Parameters with gradients moved.
    assert not torch.equal(fast[0], model.body[0].weight)


def _unrolled_meta_grad(model, rule, data, steps, lr):
    """Meta-gradient of the validation loss after ``steps`` steps of ng_step,
    unrolled by hand with torch.func.functional_call."""
    x, y, x_val, y_val = data
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in model.parameters()]
    graph = NeuralGraph.from_parameters(params)
    flat, state = graph.flatten(params), init_state(graph)
    for _ in range(steps):
        out = torch.func.functional_call(model, dict(zip(names, params)), (x,))
        loss = nn.functional.mse_loss(out, y)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        flat, state = ng_step(rule, graph, flat, graph.flatten(grads), state, lr)
        params = graph.unflatten(flat)
    out = torch.func.functional_call(model, dict(zip(names, params)), (x_val,))
    meta_loss = nn.functional.mse_loss(out, y_val)
    return meta_loss, torch.autograd.grad(meta_loss, list(rule.parameters()))


def test_meta_gradient_equals_unrolled_ng_step():
    x, y = regression_data(seed=0)
    x_val, y_val = regression_data(seed=1)
    rule = random_rule(seed=4)
    model = mlp()
    opt = NGOptimizer(model.parameters(), lr=50.0, rule=rule)
    with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
        for _ in range(3):
            diffopt.step(_loss(fmodel, x, y))
        meta_loss = _loss(fmodel, x_val, y_val)
        meta_grad = torch.autograd.grad(meta_loss, list(rule.parameters()))
    ref_loss, ref_grad = _unrolled_meta_grad(model, rule, (x, y, x_val, y_val), 3, 50.0)
    torch.testing.assert_close(meta_loss, ref_loss)
    assert sum(float(g.abs().sum()) for g in ref_grad) > 0
    for name, a, b in zip([n for n, _ in rule.named_parameters()], meta_grad, ref_grad):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-4, msg=name)


def test_overridden_lr_receives_a_gradient():
    x, y = regression_data()
    model = mlp()
    opt = NGOptimizer(model.parameters(), rule=random_rule())
    lr = torch.tensor(20.0, requires_grad=True)
    with higher.innerloop_ctx(model, opt, override={"lr": [lr]}) as (fmodel, diffopt):
        for _ in range(2):
            diffopt.step(_loss(fmodel, x, y))
        (grad,) = torch.autograd.grad(_loss(fmodel, x, y), [lr])
    assert torch.isfinite(grad) and float(grad) != 0.0


def test_test_mode_keeps_no_history():
    x, y = regression_data()
    model = mlp()
    opt = NGOptimizer(model.parameters(), rule=random_rule())
    ctx = higher.innerloop_ctx(model, opt, track_higher_grads=False)
    with ctx as (fmodel, diffopt):
        for _ in range(2):
            diffopt.step(_loss(fmodel, x, y))
        assert all(p.grad_fn is None for p in fmodel.parameters())
        assert all(t.grad_fn is None for t in diffopt.ng_state)


@pytest.mark.parametrize("mode", ["skip", "raise"])
def test_nonfinite_gradient_in_inner_loop(mode):
    x, y = regression_data()
    model = mlp()
    opt = NGOptimizer(model.parameters(), rule=random_rule(), nonfinite=mode)
    with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
        before = [p.detach().clone() for p in fmodel.parameters()]
        bad = _loss(fmodel, x, y) * float("nan")
        if mode == "raise":
            with pytest.raises(FloatingPointError, match="non-finite gradient"):
                diffopt.step(bad)
        else:
            diffopt.step(bad)
            assert diffopt.skipped_steps == 1
            assert float(diffopt.ng_state.step) == 0.0
            assert all(torch.equal(p, b) for p, b in zip(fmodel.parameters(), before))


def test_needs_an_ngoptimizer():
    model = mlp()
    with pytest.raises(TypeError, match="needs an NGOptimizer, got SGD"):
        DifferentiableNGOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1), model.parameters()
        )


def test_initial_state_after_add_param_group():
    """The optimizer's flat buffers are stale after add_param_group: the state
    is gathered per parameter (old kept, new zero)."""
    x, y = regression_data()
    model = _WithUnused()
    opt = NGOptimizer(model.body.parameters(), rule=random_rule())
    for _ in range(2):
        opt.zero_grad()
        _loss(model, x, y).backward()
        opt.step()
    opt.add_param_group({"params": model.unused.parameters()})
    with higher.innerloop_ctx(model, opt) as (_, diffopt):
        state = diffopt.ng_state
        momenta = diffopt.graph.unflatten(state.momenta)
    assert float(state.step) == 2.0
    for m, p in zip(momenta, model.body.parameters()):
        assert torch.equal(m, opt.state[p]["momenta"])
    assert all(not m.any() for m in momenta[-2:])


def test_float64_fast_weights_follow_ngoptimizer_exactly():
    """float64 fast weights get the float32 step added, as NGOptimizer does,
    instead of being rounded to float32 every step (a parameter without a
    gradient used to move by that rounding)."""
    x, y = regression_data()
    rule = random_rule(seed=1)
    model = mlp().double()
    idle = nn.Parameter(torch.full((3,), 1 / 3, dtype=torch.float64))
    model.register_parameter("idle", idle)
    reference = copy.deepcopy(model)
    ref_opt = NGOptimizer(reference.parameters(), rule=rule)
    opt = NGOptimizer(model.parameters(), rule=rule)
    with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
        for _ in range(2):
            diffopt.step(_loss(fmodel, x.double(), y.double()))
            ref_opt.zero_grad()
            _loss(reference, x.double(), y.double()).backward()
            ref_opt.step()
        fast = list(fmodel.parameters())
        for f, p in zip(fast, reference.parameters()):
            torch.testing.assert_close(f, p, atol=1e-12, rtol=1e-9)
        assert torch.equal(dict(fmodel.named_parameters())["idle"], idle)
