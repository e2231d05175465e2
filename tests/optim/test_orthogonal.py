"""Orthogonalised hidden-matrix updates (lopt.optim.orthogonal) and the
optimizer's total_steps cooldown."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from lopt import NGOptimizer
from lopt.graph import NeuralGraph
from lopt.optim.functional import init_state, ng_step
from lopt.optim.optimizer import COOLDOWN_FRACTION, cooldown_factor
from lopt.optim.orthogonal import (
    hidden_matrices,
    newton_schulz,
    ortho_plan,
    orthogonalize_flat,
    orthogonalize_steps,
    snapshot,
)
from lopt.optim.rule import load_rule


@pytest.mark.parametrize("shape", [(3, 16, 40), (2, 40, 16), (1, 8, 8)])
def test_newton_schulz_pushes_singular_values_to_one(shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    x[0, 0] *= 100.0  # one dominant direction
    o = newton_schulz(x)
    assert o.shape == x.shape
    s = torch.linalg.svdvals(o)
    assert s.min() > 0.6 and s.max() < 1.25
    # the same singular vectors: o's row space is x's, up to the values
    u, _, v = torch.linalg.svd(x, full_matrices=False)
    uo = u.mT @ o @ v.mT
    off = uo - torch.diag_embed(torch.diagonal(uo, dim1=-2, dim2=-1))
    assert off.abs().max() < 1e-3


def test_hidden_matrices_guess_and_marks():
    shapes = [torch.Size(s) for s in [(8, 4), (8,), (8, 8), (8, 8, 3), (6, 8), (2, 6)]]
    assert hidden_matrices(shapes) == [2, 4]  # 2-D, not the first or last
    marks = [True, None, False, True, None, None]
    # marks decide for 2-D tensors only: a conv kernel is never a matrix here
    assert hidden_matrices(shapes, marks) == [0, 4]
    assert hidden_matrices([torch.Size((3, 3))]) == []


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
        nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 3),
    )  # fmt: skip


def _step_inputs(model):
    params = list(model.parameters())
    graph = NeuralGraph.from_parameters(params)
    x = torch.randn(32, 5, generator=torch.Generator().manual_seed(1))
    loss = model(x).square().mean()
    grads = torch.autograd.grad(loss, params)
    flat = graph.flatten([p.detach() for p in params])
    return graph, flat, graph.flatten(list(grads))


def test_orthogonalised_update_keeps_size_and_flattens_the_spectrum():
    rule = load_rule(_default_path())
    graph, params, grads = _step_inputs(_mlp())
    plan = ortho_plan(graph, hidden_matrices(graph.shapes))
    assert plan.indices == (2, 4)
    with torch.no_grad():
        plain, _ = ng_step(rule, graph, params, grads, init_state(graph))
        ortho, _ = ng_step(rule, graph, params, grads, init_state(graph), ortho=plan)
    d_plain = graph.unflatten(plain - params)
    d_ortho = graph.unflatten(ortho - params)
    for i, (a, b) in enumerate(zip(d_plain, d_ortho)):
        if i in plan.indices:
            torch.testing.assert_close(a.norm(), b.norm(), rtol=1e-4, atol=0)
            # Every direction the update has is taken about equally far
            # (directions the update lacks stay small: Newton-Schulz grows a
            # singular value by at most 3.4x per step).
            # (five quintic steps leave singular values within 0.68-1.13).
            s, s_plain = torch.linalg.svdvals(b), torch.linalg.svdvals(a)
            assert s[0] / s.median() < 1.7 < s_plain[0] / s_plain.median()
        else:  # everything else is the rule's own update
            torch.testing.assert_close(a, b)


def test_orthogonalize_flat_is_differentiable():
    graph = NeuralGraph.from_shapes([(4, 3), (5, 4), (2, 5)])
    plan = ortho_plan(graph, [1])
    u = torch.randn(graph.num_scalars, dtype=torch.float64, requires_grad=True)
    out = orthogonalize_flat(u, plan)
    out.square().sum().backward()
    assert u.grad is not None and torch.isfinite(u.grad).all()
    assert u.grad.abs().sum() > 0


def test_fused_form_equals_the_flat_form_in_exact_arithmetic():
    """Orthogonalising the step's change (less its weight decay) equals
    orthogonalising the rule's update, then stepping: float64, so that only
    the maths is compared."""
    gen = torch.Generator().manual_seed(3)
    graph = NeuralGraph.from_shapes([(6, 4), (7, 6), (7, 6), (3, 7)])
    plan = ortho_plan(graph, [1, 2])
    p = torch.randn(graph.num_scalars, generator=gen, dtype=torch.float64)
    u = 1e-3 * torch.randn(graph.num_scalars, generator=gen, dtype=torch.float64)
    lr, wd = 0.7, 0.1
    with torch.no_grad():
        want = p + lr * (orthogonalize_flat(u.clone(), plan) - wd * p)
        got = p + lr * (u - wd * p)  # the step as the kernel makes it
        stepped = graph.unflatten(got)  # views: changed in place below
        before = snapshot(plan, graph.unflatten(p))
        orthogonalize_steps(plan, stepped, before, lambda group: -lr * wd)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert not torch.allclose(want, p + lr * (u - wd * p))  # it did something


def _train(opt_kwargs, steps=12, groups=None, model=None):
    model = model or _mlp()
    params = groups(model) if groups else model.parameters()
    opt = NGOptimizer(params, fused=False, **opt_kwargs)
    gen = torch.Generator().manual_seed(2)
    for _ in range(steps):
        x = torch.randn(16, 5, generator=gen)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    return model, opt


def test_orthogonal_false_is_the_plain_rule():
    a, _ = _train({"orthogonal": False})
    b, _ = _train({"orthogonal": True})
    c = _mlp()
    rule = load_rule(_default_path())
    params = list(c.parameters())
    graph = NeuralGraph.from_parameters(params)
    flat, state = graph.flatten([p.detach() for p in params]), init_state(graph)
    gen = torch.Generator().manual_seed(2)
    for _ in range(12):
        x = torch.randn(16, 5, generator=gen)
        live = [t.requires_grad_(True) for t in graph.unflatten(flat.clone())]
        out = torch.func.functional_call(
            c, dict(zip(dict(c.named_parameters()), live)), x
        )
        grads = torch.autograd.grad(out.square().mean(), live)
        with torch.no_grad():
            flat, state = ng_step(rule, graph, flat, graph.flatten(list(grads)), state)
    for p, q in zip(a.parameters(), graph.unflatten(flat)):
        torch.testing.assert_close(p.detach(), q)
    assert any(not torch.allclose(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_group_key_marks_matrices():
    def groups(model):
        return [
            {"params": [model[0].weight, model[0].bias], "orthogonal": True},
            {
                "params": [p for m in model[1:] for p in m.parameters()],
                "orthogonal": False,
            },
        ]

    _, opt = _train({}, steps=1, groups=groups)
    assert opt._ortho.indices == (0,)  # only the marked first layer
    with pytest.raises(ValueError, match="orthogonal"):
        NGOptimizer([{"params": _mlp().parameters(), "orthogonal": "yes"}])
    with pytest.raises(ValueError, match="orthogonal"):
        NGOptimizer(_mlp().parameters(), orthogonal=1)


def test_cooldown_factor():
    assert cooldown_factor(10**6, None) == 1.0
    total = 100
    start = int((1 - COOLDOWN_FRACTION) * total)
    assert cooldown_factor(0, total) == 1.0
    assert cooldown_factor(start - 1, total) == 1.0
    assert cooldown_factor(start, total) == 1.0
    assert cooldown_factor(start + 10, total) == pytest.approx(0.5)
    assert 0 < cooldown_factor(total - 1, total) < 0.1
    assert cooldown_factor(total, total) == 0.0


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "100"])
def test_invalid_total_steps(bad):
    with pytest.raises(ValueError, match="total_steps"):
        NGOptimizer(_mlp().parameters(), total_steps=bad)


def test_total_steps_decays_then_stops_with_a_warning():
    total = 10
    model, opt = _train({"total_steps": total}, steps=total)
    frozen = [p.detach().clone() for p in model.parameters()]
    with pytest.warns(UserWarning, match="total_steps=10"):
        model(torch.randn(4, 5)).square().mean().backward()
        opt.step()
    for p, q in zip(model.parameters(), frozen):
        assert torch.equal(p.detach(), q)  # past the end: zero steps
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        opt.step()
    # Before the cooldown the steps equal those of a run without total_steps.
    a, _ = _train({"total_steps": 100}, steps=5)
    b, _ = _train({}, steps=5)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    # In it they are smaller.
    c, _ = _train({"total_steps": 12}, steps=12, model=copy.deepcopy(_mlp()))
    d, _ = _train({}, steps=12)
    start = [p.detach() for p in _mlp().parameters()]
    moved_c = sum(float((p - s).norm()) for p, s in zip(c.parameters(), start))
    moved_d = sum(float((p - s).norm()) for p, s in zip(d.parameters(), start))
    assert moved_c < moved_d


def _default_path():
    from lopt import default_rule_path

    return default_rule_path()
