"""Adam-style learning rates brought to NGOptimizer are named, not silent."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from lopt import NGOptimizer


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))


def _train(opt, net, steps=20, before_step=None):
    gen = torch.Generator().manual_seed(1)
    for t in range(steps):
        x = torch.randn(32, 4, generator=gen)
        opt.zero_grad()
        net(x).sub(x[:, :1]).square().mean().backward()
        if before_step:
            before_step(t)
        opt.step()


def test_adam_like_lr_in_the_constructor_warns_naming_lr():
    with pytest.warns(UserWarning, match=r"lr=0\.001 was passed .*1000x smaller"):
        NGOptimizer(_net().parameters(), lr=1e-3)
    with pytest.warns(UserWarning, match=r"lr=0\.0003 is a group's lr"):
        NGOptimizer([{"params": _net().parameters(), "lr": 3e-4}])


def test_absolute_schedule_written_into_groups_warns_once():
    """nanoGPT's loop: warmup then cosine from 6e-4, written every step."""
    net = _net()
    opt = NGOptimizer(net.parameters())

    def nanogpt_lr(t, peak=6e-4, warmup=5, total=20):
        lr = (
            peak * (t + 1) / warmup
            if t < warmup
            else peak * 0.5 * (1 + math.cos(math.pi * (t - warmup) / (total - warmup)))
        )
        for group in opt.param_groups:
            group["lr"] = lr

    with pytest.warns(UserWarning, match="written into a param group") as record:
        _train(opt, net, before_step=nanogpt_lr)
    assert sum("NGOptimizer: lr=" in str(w.message) for w in record) == 1


@pytest.mark.parametrize("kind", ["default", "lambda_warmup", "onecycle", "zero"])
def test_multipliers_and_schedulers_do_not_warn(kind):
    net = _net()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lr = 0.0 if kind == "zero" else 1.0  # lr=0 freezes on purpose
        opt = NGOptimizer(net.parameters(), lr=lr)
        sched = None
        if kind == "lambda_warmup":  # starts at 1% of the multiplier
            sched = torch.optim.lr_scheduler.LambdaLR(
                opt, lambda t: min(1, (t + 1) / 100)
            )
        elif kind == "onecycle":
            sched = torch.optim.lr_scheduler.OneCycleLR(
                opt, max_lr=1.0, total_steps=20, cycle_momentum=False
            )
        for _ in range(20):
            _train(opt, net, steps=1)
            if sched:
                sched.step()
