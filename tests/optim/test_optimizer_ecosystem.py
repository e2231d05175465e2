"""NGOptimizer among the rest of torch: the global random stream, a compiled
step, and every LR scheduler torch ships."""

from __future__ import annotations

import inspect

import pytest
import torch
from conftest import mlp, regression_data, train
from torch.optim import lr_scheduler

from lopt import NGOptimizer


def _loss(model, x, y):
    return torch.nn.functional.mse_loss(model(x), y)


# ----------------------------------------------------------------------- RNG
def test_construction_and_steps_leave_the_global_rng_alone():
    """Swapping Adam for NGOptimizer must not change dropout masks or data
    order: neither building the optimizer (which loads the shipped rule) nor
    stepping it may draw from torch's global generator."""
    model = mlp()
    x, y = regression_data()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    opt = NGOptimizer(model.parameters())
    assert torch.equal(torch.get_rng_state(), before), "construction drew numbers"
    _loss(model, x, y).backward()
    opt.step()
    opt.step()
    assert torch.equal(torch.get_rng_state(), before), "a step drew numbers"


def test_dropout_masks_match_the_adam_run():
    """The user-visible symptom: the same seed gives the same random numbers
    after building NGOptimizer as after building Adam."""
    torch.manual_seed(7)
    torch.optim.Adam(mlp().parameters())
    expected = torch.rand(5)
    torch.manual_seed(7)
    NGOptimizer(mlp().parameters())
    assert torch.equal(torch.rand(5), expected)


# -------------------------------------------------------------- torch.compile
def _trajectory(step_fn_of, steps=3):
    model = mlp(seed=3)
    x, y = regression_data(seed=3)
    opt = NGOptimizer(model.parameters())
    step = step_fn_of(opt)
    for _ in range(steps):
        opt.zero_grad()
        _loss(model, x, y).backward()
        step()
    return [p.detach().clone() for p in model.parameters()], opt


def test_compiled_step_gives_the_eager_trajectory():
    eager, _ = _trajectory(lambda opt: opt.step)
    compiled, opt = _trajectory(lambda opt: torch.compile(opt.step))
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)
    assert int(next(iter(opt.state.values()))["step"]) == 3


def test_compiled_step_with_closure():
    model = mlp(seed=4)
    x, y = regression_data(seed=4)
    opt = NGOptimizer(model.parameters())
    step = torch.compile(opt.step)

    def closure():
        opt.zero_grad()
        loss = _loss(model, x, y)
        loss.backward()
        return loss

    first = float(step(closure))
    for _ in range(5):
        last = float(step(closure))
    assert last < first


# ----------------------------------------------------------------- schedulers
#: Every scheduler of torch.optim.lr_scheduler with the least arguments it
#: needs; the ones that cycle momentum by default are listed separately.
SCHEDULERS = {
    "LambdaLR": lambda o: lr_scheduler.LambdaLR(o, lambda e: 0.5**e),
    "MultiplicativeLR": lambda o: lr_scheduler.MultiplicativeLR(o, lambda e: 0.5),
    "StepLR": lambda o: lr_scheduler.StepLR(o, step_size=1),
    "MultiStepLR": lambda o: lr_scheduler.MultiStepLR(o, milestones=[1, 2]),
    "ConstantLR": lambda o: lr_scheduler.ConstantLR(o),
    "LinearLR": lambda o: lr_scheduler.LinearLR(o),
    "ExponentialLR": lambda o: lr_scheduler.ExponentialLR(o, gamma=0.5),
    "PolynomialLR": lambda o: lr_scheduler.PolynomialLR(o, total_iters=4),
    "CosineAnnealingLR": lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=4),
    "CosineAnnealingWarmRestarts": lambda o: lr_scheduler.CosineAnnealingWarmRestarts(
        o, T_0=4
    ),
    "SequentialLR": lambda o: lr_scheduler.SequentialLR(
        o,
        [lr_scheduler.ConstantLR(o), lr_scheduler.ExponentialLR(o, gamma=0.5)],
        milestones=[2],
    ),
    "ChainedScheduler": lambda o: lr_scheduler.ChainedScheduler(
        [lr_scheduler.ConstantLR(o), lr_scheduler.ExponentialLR(o, gamma=0.5)]
    ),
    "ReduceLROnPlateau": lambda o: lr_scheduler.ReduceLROnPlateau(o, patience=0),
    "OneCycleLR(cycle_momentum=False)": lambda o: lr_scheduler.OneCycleLR(
        o, max_lr=1.0, total_steps=10, cycle_momentum=False
    ),
    "CyclicLR(cycle_momentum=False)": lambda o: lr_scheduler.CyclicLR(
        o, base_lr=0.1, max_lr=1.0, step_size_up=2, cycle_momentum=False
    ),
}
MOMENTUM_CYCLING = {
    "OneCycleLR": lambda o: lr_scheduler.OneCycleLR(o, max_lr=1.0, total_steps=10),
    "CyclicLR": lambda o: lr_scheduler.CyclicLR(o, base_lr=0.1, max_lr=1.0),
}


def test_the_table_covers_every_torch_scheduler():
    """A scheduler added to torch shows up here as a failure, not a gap."""
    shipped = {
        name
        for name, cls in vars(lr_scheduler).items()
        if inspect.isclass(cls)
        and issubclass(cls, (lr_scheduler.LRScheduler, lr_scheduler.ReduceLROnPlateau))
        and cls.__name__ not in ("LRScheduler", "_LRScheduler")
    }
    covered = {name.split("(")[0] for name in [*SCHEDULERS, *MOMENTUM_CYCLING]}
    assert shipped <= covered, f"not covered: {sorted(shipped - covered)}"


@pytest.mark.parametrize("name", SCHEDULERS)
def test_scheduler_works(name):
    """Each scheduler changes the learning rate over a few steps, and the
    optimizer keeps training under it."""
    model = mlp()
    x, y = regression_data()
    opt = NGOptimizer(model.parameters())
    scheduler = SCHEDULERS[name](opt)
    lrs = [opt.param_groups[0]["lr"]]
    for _ in range(6):
        opt.zero_grad()
        loss = _loss(model, x, y)
        loss.backward()
        opt.step()
        if isinstance(scheduler, lr_scheduler.ReduceLROnPlateau):
            scheduler.step(1.0)  # a flat metric: the plateau rule cuts the lr
        else:
            scheduler.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert len(set(lrs)) > 1, f"{name} never changed the lr: {lrs}"
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("name", MOMENTUM_CYCLING)
def test_momentum_cycling_scheduler_says_what_to_pass(name):
    """With their defaults OneCycleLR and CyclicLR cycle momentum, which the
    learned rule does not have: the first step says to pass
    cycle_momentum=False, and touches nothing."""
    model = mlp()
    x, y = regression_data()
    opt = NGOptimizer(model.parameters())
    MOMENTUM_CYCLING[name](opt)
    _loss(model, x, y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="pass cycle_momentum=False"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_momentum_in_a_param_group_is_refused():
    model = mlp()
    with pytest.raises(ValueError, match=r"^Invalid momentum: 0\.9 \(NGOptimizer"):
        NGOptimizer([{"params": model.parameters(), "momentum": 0.9}])


def test_one_cycle_trains():
    model = mlp()
    x, y = regression_data()
    opt = NGOptimizer(model.parameters())
    scheduler = lr_scheduler.OneCycleLR(
        opt, max_lr=10.0, total_steps=30, cycle_momentum=False
    )
    losses, lrs = [], []
    for _ in range(30):
        lrs.append(opt.param_groups[0]["lr"])
        losses += train(model, opt, x, y, 1)
        scheduler.step()
    # A step that does nothing, or diverges, fails this.
    assert losses[-1] < 0.9 * losses[0]
    peak = max(range(30), key=lrs.__getitem__)
    assert 0 < peak < 29 and lrs[peak] == pytest.approx(10.0, rel=0.05)
