"""Permuting the hidden neurons of a network permutes NGOptimizer's update.

With a randomised rule (an untrained one is Adam, which is trivially
equivariant), one or several steps on the permuted model equal the permuted
steps on the original model.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import mlp, random_rule
from torch import nn

from lopt import NGOptimizer

ATOL = 1e-5


def _perm(n, seed):
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def _permute_mlp(model):
    """Hidden neurons of ``Linear(4, 6) -> Tanh -> Linear(6, 3)``."""
    perm = _perm(6, 1)

    def apply(m):
        out = copy.deepcopy(m)
        with torch.no_grad():
            out[0].weight.copy_(m[0].weight[perm])
            out[0].bias.copy_(m[0].bias[perm])
            out[2].weight.copy_(m[2].weight[:, perm])
            out[2].bias.copy_(m[2].bias)
        return out

    return apply


def _cnn():
    torch.manual_seed(0)
    # 6x6 -> conv 4x4 -> conv 2x2: the linear sees 5 channels x 4 positions.
    # BN after the ReLU: a bias right before BN has an exact gradient of zero,
    # and Adam-like ratios turn its rounding noise into full-size updates.
    return nn.Sequential(
        nn.Conv2d(2, 4, 3),
        nn.ReLU(),
        nn.BatchNorm2d(4),
        nn.Conv2d(4, 5, 3),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(20, 3),
    )


def _permute_cnn(model):
    """Output channels of both convs (with bias and BN parameters), the input
    channels of the next conv, and the linear's input blocks after flatten."""
    p1, p2 = _perm(4, 2), _perm(5, 3)

    def apply(m):
        out = copy.deepcopy(m)
        conv1, bn, conv2, lin = m[0], m[2], m[3], m[6]
        with torch.no_grad():
            out[0].weight.copy_(conv1.weight[p1])
            out[0].bias.copy_(conv1.bias[p1])
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(out[2], name).copy_(getattr(bn, name)[p1])
            out[3].weight.copy_(conv2.weight[p2][:, p1])
            out[3].bias.copy_(conv2.bias[p2])
            out[6].weight.copy_(lin.weight.view(3, 5, 4)[:, p2].reshape(3, 20))
            out[6].bias.copy_(lin.bias)
        return out

    return apply


CASES = {
    "mlp": (lambda: mlp(sizes=(4, 6, 3)), _permute_mlp, (16, 4), 3),
    "cnn": (_cnn, _permute_cnn, (8, 2, 6, 6), 3),
}


def _step(model, opt, x, y):
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("name", sorted(CASES))
def test_step_of_permuted_model_is_permuted_step(name, steps):
    make, permuter, x_shape, out = CASES[name]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*x_shape, generator=gen)
    y = torch.randn(x_shape[0], out, generator=gen)
    model = make()
    permute = permuter(model)
    twin = permute(model)
    # Same function: the permutation is a symmetry of the network.
    torch.testing.assert_close(twin(x), model(x), atol=ATOL, rtol=0)
    rule = random_rule(seed=5)
    opt = NGOptimizer(model.parameters(), rule=rule)
    twin_opt = NGOptimizer(twin.parameters(), rule=rule)
    start = copy.deepcopy(model)
    for _ in range(steps):
        _step(model, opt, x, y)
        _step(twin, twin_opt, x, y)
    expected = permute(model)
    for (name_, p), q, s in zip(
        twin.named_parameters(), expected.parameters(), start.parameters()
    ):
        torch.testing.assert_close(p, q, atol=ATOL, rtol=0, msg=name_)
        assert not torch.equal(q, s)


def test_random_rule_is_not_elementwise():
    """The equivariance test is meaningful only if the rule mixes information
    across neurons: changing one neuron's gradient changes other updates."""
    rule = random_rule(seed=5)
    model = mlp(sizes=(4, 6, 3))
    twin = copy.deepcopy(model)
    opts = [NGOptimizer(m.parameters(), rule=rule) for m in (model, twin)]
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(p.shape, generator=gen) for p in model.parameters()]
    for m, opt, scale in zip((model, twin), opts, (1.0, 3.0)):
        for i, (p, g) in enumerate(zip(m.parameters(), grads)):
            p.grad = g.clone()
            if i == 0:
                p.grad[0] *= scale
        opt.step()
    # Neuron 0's incoming weights change, and so do other neurons' updates.
    assert not torch.allclose(model[0].weight[1:], twin[0].weight[1:], atol=1e-7)
