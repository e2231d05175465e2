"""NGOptimizer honours the torch.optim.Optimizer contract."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from conftest import TINY_CONFIG, mlp, random_rule, regression_data, train
from torch import nn

from lopt import NGOptimizer, UpdateRule


def _loss(model, x, y):
    return nn.functional.mse_loss(model(x), y)


# ------------------------------------------------------------------ training
def test_loss_falls_on_regression_with_default_rule():
    x, y = regression_data()
    model = mlp(sizes=(4, 16, 3))
    losses = train(model, NGOptimizer(model.parameters(), lr=10.0), x, y, 100)
    assert losses[-1] < 0.5 * losses[0], losses[::10]


def test_loss_falls_on_classification_with_default_rule():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=gen)
    y = (x[:, 0] + x[:, 1] > 0).long()
    model = mlp(sizes=(4, 8, 2))
    opt = NGOptimizer(model.parameters(), lr=10.0)
    losses = train(model, opt, x, y, 60, nn.functional.cross_entropy)
    assert losses[-1] < 0.5 * losses[0], losses[::10]


# ---------------------------------------------------------------- state dict
def test_state_dict_round_trip_gives_identical_trajectory():
    x, y = regression_data()
    rule = random_rule()
    model = mlp()
    opt = NGOptimizer(model.parameters(), rule=rule, weight_decay=0.1)
    train(model, opt, x, y, 3)
    saved = copy.deepcopy(opt.state_dict())
    twin = copy.deepcopy(model)
    twin_opt = NGOptimizer(twin.parameters(), rule=rule, weight_decay=0.1)
    twin_opt.load_state_dict(saved)
    assert twin_opt.state_dict()["state"].keys() == saved["state"].keys()
    train(model, opt, x, y, 3)
    train(twin, twin_opt, x, y, 3)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(
        opt.state[model[0].weight]["momenta"], twin_opt.state[twin[0].weight]["momenta"]
    )


def test_state_dict_contents():
    x, y = regression_data()
    model = mlp()
    opt = NGOptimizer(model.parameters(), rule=random_rule())
    train(model, opt, x, y, 2)
    state = opt.state_dict()
    assert state["ng"] == {"skipped_steps": 0}
    first = state["state"][0]
    assert float(first["step"]) == 2.0
    assert first["momenta"].shape == (4, *model[0].weight.shape)
    assert first["second_moment"].shape == model[0].weight.shape
    assert state["param_groups"][0]["lr"] == 1.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_have_float32_state(dtype):
    x, y = regression_data()
    model = mlp().to(dtype)
    opt = NGOptimizer(model.parameters(), rule=random_rule())
    losses = train(model, opt, x.to(dtype), y.to(dtype), 5)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert all(p.dtype == dtype for p in model.parameters())
    for p in model.parameters():
        assert opt.state[p]["momenta"].dtype == torch.float32
        assert opt.state[p]["second_moment"].dtype == torch.float32
    twin = copy.deepcopy(model)
    twin_opt = NGOptimizer(twin.parameters(), rule=opt.rule)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    for p, q in zip(model.parameters(), twin.parameters()):
        assert twin_opt.state[q]["momenta"].dtype == torch.float32
        # Loading keeps full precision (no round trip through the param dtype).
        assert torch.equal(twin_opt.state[q]["momenta"], opt.state[p]["momenta"])
    train(model, opt, x.to(dtype), y.to(dtype), 2)
    train(twin, twin_opt, x.to(dtype), y.to(dtype), 2)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))


def test_low_precision_loss_falls():
    x, y = regression_data()
    model = mlp(sizes=(4, 16, 3)).to(torch.bfloat16)
    opt = NGOptimizer(model.parameters(), lr=10.0)
    losses = train(model, opt, x.bfloat16(), y.bfloat16(), 60)
    assert losses[-1] < 0.7 * losses[0]


# ------------------------------------------------------------- lr and groups
def test_lr_scheduler_halves_the_step():
    rule = random_rule()
    models = [mlp(), mlp()]
    opts = [NGOptimizer(m.parameters(), lr=1.0, rule=rule) for m in models]
    scheduler = torch.optim.lr_scheduler.StepLR(opts[0], step_size=1, gamma=0.5)
    gen = torch.Generator().manual_seed(0)
    frozen = [torch.randn(p.shape, generator=gen) for p in models[0].parameters()]
    deltas = []
    for step in range(2):
        for model, opt in zip(models, opts):
            before = [p.detach().clone() for p in model.parameters()]
            for p, g in zip(model.parameters(), frozen):
                p.grad = g.clone()
            opt.step()
            if step == 1:
                deltas.append([p - b for p, b in zip(model.parameters(), before)])
        scheduler.step()
    assert opts[0].param_groups[0]["lr"] == 0.25
    for halved, full in zip(*deltas):
        assert full.abs().max() > 0
        torch.testing.assert_close(halved, 0.5 * full)


def test_group_with_zero_lr_does_not_move():
    x, y = regression_data()
    model = mlp()
    first, second = model[0], model[2]
    frozen = [p.detach().clone() for p in first.parameters()]
    opt = NGOptimizer(
        [{"params": first.parameters(), "lr": 0.0}, {"params": second.parameters()}],
        rule=random_rule(),
    )
    moving = [p.detach().clone() for p in second.parameters()]
    train(model, opt, x, y, 2)
    assert all(torch.equal(p, f) for p, f in zip(first.parameters(), frozen))
    assert all(not torch.equal(p, m) for p, m in zip(second.parameters(), moving))


def test_add_param_group_keeps_old_state_and_zeroes_new():
    x, y = regression_data()
    rule = UpdateRule(TINY_CONFIG)
    model = mlp()
    head = nn.Linear(3, 3)
    opt = NGOptimizer(model.parameters(), rule=rule)
    train(model, opt, x, y, 2)
    old = {p: opt.state[p]["momenta"].clone() for p in model.parameters()}
    opt.add_param_group({"params": head.parameters(), "lr": 0.5})
    assert len(opt.param_groups) == 2 and opt.param_groups[1]["lr"] == 0.5
    assert all(torch.equal(opt.state[p]["momenta"], m) for p, m in old.items())
    assert all(p not in opt.state for p in head.parameters())
    opt.zero_grad()
    _loss(lambda inp: head(model(inp)), x, y).backward()
    grads = {p: p.grad.clone() for p in [*model.parameters(), *head.parameters()]}
    opt.step()
    betas = torch.tensor([0.5, 0.9, 0.99, 0.999])
    for p in head.parameters():
        expected = (1 - betas).view(-1, *[1] * p.dim()) * grads[p]
        torch.testing.assert_close(opt.state[p]["momenta"], expected)
    for p, m in old.items():
        b = betas.view(-1, *[1] * p.dim())
        torch.testing.assert_close(opt.state[p]["momenta"], b * m + (1 - b) * grads[p])


def test_params_without_grads_stay_bit_identical():
    x, y = regression_data()
    model = mlp()
    unused = nn.Linear(5, 5)
    opt = NGOptimizer([*model.parameters(), *unused.parameters()], rule=random_rule())
    before = [p.detach().clone() for p in unused.parameters()]
    moved = [p.detach().clone() for p in model.parameters()]
    train(model, opt, x, y, 3)
    assert all(p.grad is None for p in unused.parameters())
    assert all(torch.equal(p, b) for p, b in zip(unused.parameters(), before))
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), moved))
    assert all(not opt.state[p]["momenta"].any() for p in unused.parameters())


def test_step_without_any_grad_is_a_no_op():
    model = mlp()
    opt = NGOptimizer(model.parameters(), rule=random_rule())
    before = [p.detach().clone() for p in model.parameters()]
    assert opt.step() is None
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_step_closure_returns_its_loss():
    x, y = regression_data()
    model = mlp()
    opt = NGOptimizer(model.parameters(), rule=random_rule())
    calls = []

    def closure():
        opt.zero_grad()
        loss = _loss(model, x, y)
        loss.backward()
        calls.append(loss)
        return loss

    before = [p.detach().clone() for p in model.parameters()]
    returned = opt.step(closure)
    assert len(calls) == 1 and returned is calls[0]
    assert returned.requires_grad
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_zero_grad():
    x, y = regression_data()
    model = mlp()
    opt = NGOptimizer(model.parameters(), rule=random_rule())
    _loss(model, x, y).backward()
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_step_hooks_are_called():
    x, y = regression_data()
    model = mlp()
    opt = NGOptimizer(model.parameters(), rule=random_rule())
    calls = []
    pre = opt.register_step_pre_hook(lambda o, a, k: calls.append(("pre", o)))
    post = opt.register_step_post_hook(
        lambda o, a, k: calls.append(("post", float(o.state[model[0].weight]["step"])))
    )
    train(model, opt, x, y, 2)
    assert calls == [("pre", opt), ("post", 1.0), ("pre", opt), ("post", 2.0)]
    pre.remove()
    post.remove()
    train(model, opt, x, y, 1)
    assert len(calls) == 4


# ----------------------------------------------------------------- nonfinite
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_gradient_skips_step(bad):
    x, y = regression_data()
    model = mlp()
    opt = NGOptimizer(model.parameters(), rule=random_rule())
    train(model, opt, x, y, 1)
    before = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict()["state"])
    opt.zero_grad()
    _loss(model, x, y).backward()
    model[0].weight.grad[0, 0] = bad
    opt.step()
    assert opt.skipped_steps == 1
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    after = opt.state_dict()["state"]
    assert float(after[0]["step"]) == 1.0
    assert all(torch.equal(after[i]["momenta"], state[i]["momenta"]) for i in state)
    assert opt.state_dict()["ng"] == {"skipped_steps": 1}


def test_nonfinite_gradient_raises_when_asked():
    x, y = regression_data()
    model = mlp()
    opt = NGOptimizer(model.parameters(), rule=random_rule(), nonfinite="raise")
    _loss(model, x, y).backward()
    model[2].bias.grad[0] = float("nan")
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(FloatingPointError, match="^NGOptimizer: non-finite gradient$"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


# ------------------------------------------------------------- bad arguments
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"lr": -1.0}, "Invalid learning rate: -1.0"),
        ({"lr": float("nan")}, "Invalid learning rate: nan"),
        ({"weight_decay": -0.1}, "Invalid weight_decay value: -0.1"),
        (
            {"nonfinite": "ignore"},
            "Invalid nonfinite: 'ignore' (expected one of ('skip', 'raise'))",
        ),
        (
            {"rule": 3},
            "Invalid rule: 3 (expected one of ('default', 'full', 'base'), a path "
            "or an UpdateRule)",
        ),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        NGOptimizer(mlp().parameters(), **kwargs)


def test_bad_group_lr():
    opt = NGOptimizer(mlp().parameters(), rule=random_rule())
    with pytest.raises(ValueError, match=r"^Invalid learning rate: -2\.0$"):
        opt.add_param_group({"params": [nn.Parameter(torch.ones(2))], "lr": -2.0})


def test_integer_params_rejected():
    message = "Invalid parameter dtype: torch.int64 (need a float dtype)"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        NGOptimizer([torch.zeros(3, dtype=torch.long)], rule=random_rule())


def test_missing_rule_path(tmp_path):
    with pytest.raises(FileNotFoundError):
        NGOptimizer(mlp().parameters(), rule=tmp_path / "missing")


def test_scalar_parameter_is_updated():
    temperature = nn.Parameter(torch.tensor(2.0))
    weight = nn.Parameter(torch.randn(3, 2))
    opt = NGOptimizer([temperature, weight], rule=random_rule())
    (temperature * weight.sum()).backward()
    opt.step()
    assert float(temperature.detach()) != 2.0
    assert opt.state[temperature]["momenta"].shape == (4,)


def test_only_empty_parameters_step_without_error():
    # A zero-width layer has nothing to update; the step must still run and
    # keep (empty) state, like torch.optim's optimizers do.
    empty = nn.Parameter(torch.zeros(0, 3))
    opt = NGOptimizer([empty], rule=random_rule())
    empty.grad = torch.zeros(0, 3)
    opt.step()
    opt.step()
    assert empty.shape == (0, 3)
    assert int(opt.state[empty]["step"]) == 2


def test_shipped_rules_load_by_name():
    import lopt

    default = NGOptimizer(mlp().parameters()).rule
    full = NGOptimizer(mlp().parameters(), rule="full").rule
    # the default is the lean rule, distilled from the full one
    assert not default.config.edge_mlp and default.config.edge_hidden == 0
    assert full.config.edge_mlp and full.config.edge_hidden == 8
    assert "lopt/rules/full" in default.metadata["teacher_path"]  # where it was then
    assert lopt.default_rule_path("full").endswith("full")
    with pytest.raises(ValueError, match=r"^Invalid rule: 'fast' \(shipped: "):
        lopt.default_rule_path("fast")
