"""PES is unbiased: on a toy quadratic its mean estimate matches the exact
whole-horizon gradient, which truncated backprop does not."""

import torch

from meta_train.estimators import PESSlot, pes_step

A = torch.tensor([1.0, 4.0], dtype=torch.float64)  # curvatures
X0 = torch.tensor([1.0, 1.0], dtype=torch.float64)
T, K = 3, 4  # steps per truncation, truncations


def _unroll(theta, x, num_steps):
    """Gradient descent with learning rate theta on 0.5 * sum(A x^2); meta-loss
    of a truncation = mean loss after each step."""
    losses = []
    for _ in range(num_steps):
        x = x - theta * A * x
        losses.append(0.5 * (A * x * x).sum())
    return torch.stack(losses).mean(), x


def _whole_horizon_gradient(theta0):
    theta = torch.tensor(theta0, dtype=torch.float64, requires_grad=True)
    x, total = X0, 0.0
    for _ in range(K):
        loss, x = _unroll(theta, x, T)
        total = total + loss
    (grad,) = torch.autograd.grad(total, theta)
    return float(grad)


def _tbptt_gradient(theta0):
    x, total = X0, 0.0
    for _ in range(K):
        theta = torch.tensor(theta0, dtype=torch.float64, requires_grad=True)
        loss, x = _unroll(theta, x.detach(), T)
        total += float(torch.autograd.grad(loss, theta)[0])
    return total


def _pes_gradient(theta0, samples, sigma=1e-3):
    gen = torch.Generator().manual_seed(0)
    theta = torch.tensor([theta0], dtype=torch.float64)

    def unroll(th, x, _gen):
        loss, x = _unroll(th[0], x, T)
        return float(loss), x

    total = torch.zeros(1, dtype=torch.float64)
    for _ in range(samples):
        slot = PESSlot(X0, X0, torch.zeros(1, dtype=torch.float64))
        for _ in range(K):
            grad, _, slot = pes_step(theta, slot, unroll, sigma, gen)
            total += grad
    return float(total) / samples


def test_pes_matches_whole_horizon_gradient_and_tbptt_does_not():
    theta0 = 0.1
    exact = _whole_horizon_gradient(theta0)
    tbptt = _tbptt_gradient(theta0)
    pes = _pes_gradient(theta0, samples=2000)
    assert abs(tbptt - exact) > 0.2 * abs(exact)  # truncation bias is real here
    assert abs(pes - exact) < 0.05 * abs(exact), (pes, exact, tbptt)


def test_pes_pair_sees_same_batches():
    gen = torch.Generator().manual_seed(0)
    seen = []

    def unroll(th, state, g):
        seen.append(float(torch.rand((), generator=g)))
        return float(th.sum()), state

    slot = PESSlot(None, None, torch.zeros(3))
    pes_step(torch.zeros(3), slot, unroll, 0.1, gen)
    assert seen[0] == seen[1]
