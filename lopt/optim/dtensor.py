"""``DTensor`` parameters (FSDP2 ``fully_shard``, tensor parallelism).

The learned rule aggregates over whole layers (a neuron's fan-in and fan-out
statistics), so a rank cannot update its shard from the shard alone. For
``DTensor`` parameters :class:`~lopt.optim.optimizer.NGOptimizer` therefore

1. all-gathers each parameter and gradient (:meth:`DTensor.full_tensor`),
2. runs the learned step on the full tensors, identically on every rank (its
   optimizer state is kept full and replicated: every rank computes the same
   state from the same full gradients), and
3. writes back only the rank's own part of each new parameter (no
   communication: each rank cuts its shard out of its full result).

Memory: during a step every rank holds the full parameters and gradients, and
it always holds the full optimizer state (``len(MOMENTUM_DECAYS) + 1`` float32
values per scalar), plus the step's transient buffers for the whole model.
So sharding saves memory outside the optimizer step only; the optimizer costs
each rank what it costs an unsharded model. Communication per step: one
all-gather of the parameters and one of the gradients.

Plain tensors pass through unchanged. :func:`is_dtensor` and
:func:`full_tensors` never import ``torch.distributed.tensor`` (without it no
``DTensor`` can exist); :func:`copy_into` runs only when a ``DTensor`` does.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch

__all__ = ["is_dtensor", "full_tensors", "copy_into"]


def _dtensor_type() -> type | None:
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def is_dtensor(tensor: object) -> bool:
    """Whether ``tensor`` is a ``torch.distributed.tensor.DTensor``."""
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(tensor, dtensor)


def full_tensors(tensors: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """Each ``DTensor`` as its full (all-gathered) plain tensor; plain tensors
    and ``None`` unchanged. Collective: every rank must call it with the same
    sequence of ``DTensor`` s."""
    dtensor = _dtensor_type()
    if dtensor is None:
        return list(tensors)
    return [t.full_tensor() if isinstance(t, dtensor) else t for t in tensors]


def copy_into(params: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> None:
    """Copy full ``values`` into ``params`` in place (called by
    :class:`~lopt.optim.optimizer.NGOptimizer` only when some parameter is a
    ``DTensor``): plain parameters whole, ``DTensor`` parameters their local
    part only (cut out of the full value with the parameter's own mesh and
    placements, without communication)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    for p, value in zip(params, values):
        if isinstance(p, DTensor):
            value = distribute_tensor(
                value, p.device_mesh, p.placements, src_data_rank=None
            )
        p.copy_(value)
