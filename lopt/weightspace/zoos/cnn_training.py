"""Training many small CNNs at once on the 8x8 digits (for the CNN zoos).

Runs of one architecture train together: ``vmap`` over ``functional_call``
of one module on the meta device (BatchNorm running statistics are stacked
buffers updated in place, which vmap supports), the whole stack stepped by a
batched Adam / SGD with per-net learning rate, weight decay and optimizer
choice, per-net dropout masks before the head and per-net batches drawn from
per-net subsets of the training set. A run whose update makes a weight or
buffer non-finite keeps its last finite state from then on (``diverged_at``
records the step), so no zoo holds NaNs.

``vmap(functional_call)`` is as fast per net-step as a hand-written grouped
convolution and faster than an im2col + ``bmm`` model or one net at a time;
these tiny convolutions lose to thread overhead, so one torch thread is
usually the faster setting (measurements: ``docs/design-notes-code.md``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, vmap

from lopt.weightspace.zoos.specs import build_module, init_state_dict
from lopt.weightspace.zoos.store import derive_seed

__all__ = [
    "TrainingConfig",
    "digits_images",
    "evaluate",
    "sample_hyperparameters",
    "train_runs",
]

_EVAL_BATCH = 256


@dataclass(frozen=True)
class TrainingConfig:
    """Training budget and the ranges hyperparameters are drawn from.

    Attributes:
        checkpoints: steps after which a checkpoint is kept (each is a net).
        batch_size: images per step.
        sgd_probability: chance that a run uses SGD (momentum 0.9), else Adam.
        lr_adam, lr_sgd: log-uniform learning-rate ranges.
        weight_decay: log-uniform L2 coefficient range (added to gradients).
        init_scale: log-uniform factor on the default initial weights.
        dropout: uniform range of the dropout rate before the head.
        data_fraction: uniform range of the fraction of the training set a
            run may sample from.
        val_fraction: runs (of training architectures) held out for val.
    """

    checkpoints: tuple[int, ...] = (25, 50, 100, 200, 400, 800)
    batch_size: int = 32
    sgd_probability: float = 0.5
    lr_adam: tuple[float, float] = (1e-4, 3e-2)
    lr_sgd: tuple[float, float] = (1e-3, 0.3)
    weight_decay: tuple[float, float] = (1e-6, 1e-2)
    init_scale: tuple[float, float] = (0.3, 3.0)
    dropout: tuple[float, float] = (0.0, 0.5)
    data_fraction: tuple[float, float] = (0.05, 1.0)
    val_fraction: float = 0.1


@cache
def digits_images() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Standardised 8x8 digits ``(N, 1, 8, 8)`` and labels: train, then test.

    The split is meta_train's: ``permutation(default_rng(0))``, last 20% held
    out; pixels are divided by 16 and standardised with the training mean and
    standard deviation (two scalars).
    """
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.from_numpy(np.random.default_rng(0).permutation(len(x)))
    x, y = x[perm], y[perm]
    cut = int(0.8 * len(x))
    mean, std = x[:cut].mean(), x[:cut].std()
    x = (x - mean) / std
    return x[:cut], y[:cut], x[cut:], y[cut:]


def _log_uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return float(np.exp(rng.uniform(np.log(bounds[0]), np.log(bounds[1]))))


def sample_hyperparameters(
    config: TrainingConfig, seed: int, run: int
) -> dict[str, Any]:
    """The training hyperparameters of run ``run`` (a function of both only)."""
    rng = np.random.default_rng(derive_seed(seed, run))
    sgd = bool(rng.uniform() < config.sgd_probability)
    return {
        "optimizer": "sgd" if sgd else "adam",
        "lr": _log_uniform(rng, config.lr_sgd if sgd else config.lr_adam),
        "weight_decay": _log_uniform(rng, config.weight_decay),
        "init_scale": _log_uniform(rng, config.init_scale),
        "dropout": float(rng.uniform(*config.dropout)),
        "data_fraction": float(rng.uniform(*config.data_fraction)),
        "batch_size": config.batch_size,
        "init_seed": derive_seed(seed, run, 1),
        "data_seed": derive_seed(seed, run, 2),
    }


def _forward(base: torch.nn.Module, params, buffers, x, mask):
    """One net: pooled features, per-net dropout mask, linear head."""
    prefix = len("features.")
    features = {k[prefix:]: v for k, v in {**params, **buffers}.items() if k[0] == "f"}
    h = functional_call(base.features, features, (x,))
    if mask is not None:
        h = h * mask
    return F.linear(h, params["head.weight"], params["head.bias"])


def evaluate(
    base: torch.nn.Module,
    params: dict[str, torch.Tensor],
    buffers: dict[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Accuracy and mean cross-entropy ``(N,)`` of stacked nets in eval mode."""
    base.eval()
    run = vmap(lambda p, b, xb: _forward(base, p, b, xb, None), in_dims=(0, 0, None))
    correct, loss = 0.0, 0.0
    with torch.no_grad():
        for start in range(0, len(x), _EVAL_BATCH):
            xb, yb = x[start : start + _EVAL_BATCH], y[start : start + _EVAL_BATCH]
            logits = run(params, buffers, xb)  # (N, B, classes)
            correct = correct + (logits.argmax(-1) == yb).sum(1)
            nll = F.cross_entropy(
                logits.transpose(1, 2), yb.expand(len(logits), -1), reduction="none"
            )
            loss = loss + nll.sum(1)
    return correct / len(x), loss / len(x)


def _initial_state(spec, hparams) -> dict[str, torch.Tensor]:
    state = init_state_dict(spec, hparams["init_seed"])
    for key, value in state.items():
        if key.endswith("weight") and value.dim() > 1:  # conv and linear weights
            value.mul_(hparams["init_scale"])
    return state


def train_runs(
    spec: dict[str, Any],
    runs: list[dict[str, Any]],
    checkpoints: tuple[int, ...],
    generator: torch.Generator,
) -> list[tuple[int, dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
    """Train runs of one architecture together on the digits.

    Args:
        spec: a ``"cnn"`` spec for 1-channel 8x8 inputs and 10 classes.
        runs: hyperparameters per run (see :func:`sample_hyperparameters`).
        checkpoints: steps after which to keep a checkpoint (increasing).
        generator: draws batches and dropout masks.

    Returns:
        Per checkpoint: ``(step, stacked state dict, metrics)``, the metrics
        ``(N,)`` tensors ``test_accuracy``, ``test_loss``, ``train_accuracy``,
        ``train_loss``, ``diverged_at`` (-1 for runs that never diverged).
    """
    x_train, y_train, x_test, y_test = digits_images()
    n, num_train = len(runs), len(x_train)
    base = build_module(spec).to("meta")
    param_keys = [k for k, _ in base.named_parameters()]
    states = [_initial_state(spec, h) for h in runs]
    params = {
        k: torch.stack([s[k] for s in states]).requires_grad_() for k in param_keys
    }
    buffers = {
        k: torch.stack([s[k] for s in states]) for k in states[0] if k not in params
    }

    lr = torch.tensor([h["lr"] for h in runs])
    wd = torch.tensor([h["weight_decay"] for h in runs])
    adam = torch.tensor([h["optimizer"] == "adam" for h in runs])
    drop = torch.tensor([h["dropout"] for h in runs])
    batch = runs[0]["batch_size"]
    subsets, sizes = [], []
    for h in runs:
        order = np.random.default_rng(h["data_seed"]).permutation(num_train)
        subsets.append(torch.from_numpy(order))
        sizes.append(max(batch, round(h["data_fraction"] * num_train)))
    subsets_t, sizes_t = torch.stack(subsets), torch.tensor(sizes)[:, None]
    width = spec["channels"][-1]
    moments = {k: (torch.zeros_like(p), torch.zeros_like(p)) for k, p in params.items()}
    diverged_at = torch.full((n,), -1, dtype=torch.long)
    train_step = vmap(lambda p, b, x, m: _forward(base, p, b, x, m))
    out = []
    for step in range(1, max(checkpoints) + 1):
        base.train()
        pos = (torch.rand((n, batch), generator=generator) * sizes_t).long()
        idx = subsets_t.gather(1, pos)
        keep = torch.rand((n, batch, width), generator=generator) >= drop[:, None, None]
        mask = keep / (1 - drop)[:, None, None]
        saved = {k: v.detach().clone() for k, v in {**params, **buffers}.items()}
        logits = train_step(params, buffers, x_train[idx], mask)
        losses = F.cross_entropy(logits.transpose(1, 2), y_train[idx], reduction="none")
        losses = losses.mean(1)
        grads = torch.autograd.grad(losses.sum(), list(params.values()))
        with torch.no_grad():
            ok = torch.isfinite(losses)
            for (key, p), g in zip(params.items(), grads):
                m, v = moments[key]
                rows = (-1, *[1] * (p.dim() - 1))
                g = g + wd.reshape(rows) * p
                # m is Adam's first moment in Adam rows and the momentum
                # buffer (m = 0.9 m + g, as torch.optim.SGD) in SGD rows.
                m.copy_(torch.where(adam.reshape(rows), 0.9 * m + 0.1 * g, 0.9 * m + g))
                v.mul_(0.999).addcmul_(g, g, value=0.001)
                m_hat, v_hat = m / (1 - 0.9**step), v / (1 - 0.999**step)
                update = torch.where(
                    adam.reshape(rows), m_hat / (v_hat.sqrt() + 1e-8), m
                )
                p.sub_(lr.reshape(rows) * update)
                ok &= torch.isfinite(p.reshape(n, -1)).all(1)
            for b in buffers.values():
                if b.is_floating_point():
                    ok &= torch.isfinite(b.reshape(n, -1)).all(1)
            newly = ~ok & (diverged_at < 0)
            diverged_at[newly] = step
            frozen = diverged_at >= 0
            if frozen.any():
                for key, t in {**params, **buffers}.items():
                    rows = frozen.reshape(-1, *[1] * (t.dim() - 1))
                    t.copy_(torch.where(rows, saved[key], t))
        if step in checkpoints:
            p_now = {k: v.detach().clone() for k, v in params.items()}
            b_now = {k: v.clone() for k, v in buffers.items()}
            test_acc, test_loss = evaluate(base, p_now, b_now, x_test, y_test)
            train_acc, train_loss = evaluate(base, p_now, b_now, x_train, y_train)
            metrics = {
                "test_accuracy": test_acc,
                "test_loss": test_loss,
                "train_accuracy": train_acc,
                "train_loss": train_loss,
                "diverged_at": diverged_at.clone(),
            }
            out.append((step, {**p_now, **b_now}, metrics))
    return out
