"""Data-parallel meta-training with ``torch.distributed``.

Launched with ``torchrun --nproc_per_node=N -m meta_train ...``: every worker
unrolls its own tasks (its task stream is seeded by its rank), and the
meta-gradients are averaged with an all-reduce before the outer step, so all
workers keep identical rule weights. gloo on the CPU, nccl on GPUs. Without
torchrun's environment everything runs in one process and these helpers are
no-ops.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = ["init_from_env", "world", "all_reduce_mean_", "barrier"]


def init_from_env() -> tuple[int, int]:
    """Join the process group described by torchrun's environment variables.

    Returns:
        ``(rank, world_size)``; ``(0, 1)`` outside torchrun.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the current process group, or ``(0, 1)``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_mean_(tensors: list[torch.Tensor]) -> None:
    """Average ``tensors`` in place across workers (one flat all-reduce)."""
    _, size = world()
    if size == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= size
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()
