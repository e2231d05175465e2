"""Meta-gradient estimators over truncated unrolls.

* **Truncated backprop through time** (:func:`meta_train.unroll.truncated_unroll`
  with autograd): low variance, but biased towards greedy rules because nothing
  flows back across truncation boundaries.
* **Persistent evolution strategies** (PES, Vicol et al. 2021), antithetic:
  each task slot keeps two inner states run with ``theta + eps`` and
  ``theta - eps`` and the running sum ``xi`` of all perturbations used since the
  task started. The estimate ``xi * (L+ - L-) / (2 sigma^2)`` is unbiased for
  the gradient of the whole-horizon meta-loss of the Gaussian-smoothed
  objective, however long the horizon, and needs no backward pass.

:func:`pes_step` is generic over the unroll so it can be checked on a toy
problem against exact whole-horizon gradients (``tests/test_estimators.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["PESSlot", "pes_step", "ESTIMATORS"]

ESTIMATORS = ("tbptt", "pes")

#: ``unroll(theta, state, generator) -> (meta_loss: float, new_state)``
Unroll = Callable[[torch.Tensor, Any, torch.Generator], tuple[float, Any]]


@dataclass
class PESSlot:
    """Antithetic pair of inner states and their accumulated perturbation."""

    pos: Any
    neg: Any
    xi: torch.Tensor  # sum of the perturbations applied since the task started


def pes_step(
    theta: torch.Tensor,
    slot: PESSlot,
    unroll: Unroll,
    sigma: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, float, PESSlot]:
    """One antithetic PES truncation for one slot.

    Both halves of the pair see the same batches: the generator is rewound
    before the negative unroll.

    Returns:
        ``(gradient estimate, mean meta-loss of the pair, new slot)``.
    """
    eps = sigma * torch.randn(theta.shape, generator=generator, dtype=theta.dtype)
    rewind = generator.get_state()
    loss_pos, pos = unroll(theta + eps, slot.pos, generator)
    generator.set_state(rewind)
    loss_neg, neg = unroll(theta - eps, slot.neg, generator)
    xi = slot.xi + eps
    grad = xi * ((loss_pos - loss_neg) / (2.0 * sigma**2))
    return grad, 0.5 * (loss_pos + loss_neg), PESSlot(pos, neg, xi)
