"""Shared helpers for the lopt tests: tiny models and randomised rules."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lopt import RuleConfig, UpdateRule

# The tests use tiny tensors: one thread avoids contention on a shared machine
# (with two, a small conv can run fifty times slower).
torch.set_num_threads(1)

#: Small widths keep every test fast on a CPU.
TINY_CONFIG = RuleConfig(node_dim=8, edge_dim=4, num_layers=1, head_hidden=4)


def randomise(rule: UpdateRule, seed: int = 0, std: float = 0.2) -> UpdateRule:
    """Re-initialise every weight of ``rule`` with small normal noise.

    An untrained rule is exactly Adam (its learned path is zero), which would
    make equivariance and meta-gradient tests pass trivially.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in rule.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)
    return rule


def random_rule(seed: int = 0, config: RuleConfig = TINY_CONFIG) -> UpdateRule:
    """A rule with random weights (deterministic in ``seed``)."""
    return randomise(UpdateRule(config), seed)


def mlp(seed: int = 0, sizes: tuple[int, ...] = (4, 6, 3)) -> nn.Sequential:
    """A small tanh MLP with fixed initial weights."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def regression_data(seed: int = 0, n: int = 32, d_in: int = 4, d_out: int = 3):
    """Inputs and targets of a random linear regression problem."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=gen)
    w = torch.randn(d_in, d_out, generator=gen)
    return x, x @ w


@pytest.fixture
def rule() -> UpdateRule:
    return random_rule()


def train(model, opt, x, y, steps, loss_fn=nn.functional.mse_loss) -> list[float]:
    """``steps`` full-batch training steps; the loss before each step."""
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def paired_step(fused_model, fused_opt, ref_model, ref_opt, x, rel=1e-4) -> None:
    """One step of a fused and a reference optimizer from the same point: the
    reference model's weights and gradients (of ``mean(model(x)^2)``) are copied
    into the fused one, both step, and every parameter must move and the two
    updates agree to float32 rounding of the parameter plus ``rel`` of the
    step."""
    before = [p.detach().clone() for p in ref_model.parameters()]
    ref_opt.zero_grad()
    ref_model(x).square().mean().backward()
    for p, q in zip(fused_model.parameters(), ref_model.parameters()):
        p.grad = q.grad.clone()
        p.data.copy_(q.data)  # the same point, so only the step differs
    fused_opt.step()
    ref_opt.step()
    for p, q, q0 in zip(fused_model.parameters(), ref_model.parameters(), before):
        step = (q - q0).abs().max()
        assert step > 0
        tol = rel * step + 4 * torch.finfo(torch.float32).eps * q0.abs().max()
        assert (p - q).abs().max() <= tol
