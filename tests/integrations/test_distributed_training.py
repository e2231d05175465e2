"""NGOptimizer in distributed training: DDP and FSDP2 on 2 gloo CPU processes.

Workers are started with ``torch.multiprocessing.spawn`` and join the process
group through a file in ``tmp_path`` (no port to pick). Each worker returns a
result that rank 0 gathers and saves; the assertions run in the test process.
"""

from __future__ import annotations

import datetime
from contextlib import nullcontext

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import mlp, regression_data, train
from torch import nn

from lopt import NGOptimizer

WORLD = 2
STEPS = 4

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(),
    reason="needs torch.distributed with gloo",
)


# ------------------------------------------------------------------ launching
def _entry(rank: int, worker, init_file: str, out: str, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        result = worker(rank, *args)
        gathered = [None] * WORLD if rank == 0 else None
        dist.gather_object(result, gathered, dst=0)
        if rank == 0:
            torch.save(gathered, out)
        # No rank tears its connections down while another still uses them
        # (a suspect for the rare SIGABRT of a worker seen in full runs).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_workers(worker, tmp_path, *args) -> list:
    """Run ``worker(rank, *args)`` in ``WORLD`` processes; their results by rank."""
    out = tmp_path / "results.pt"
    mp.spawn(
        _entry,
        args=(worker, str(tmp_path / "store"), str(out), args),
        nprocs=WORLD,
        join=True,
    )
    return torch.load(out, weights_only=False)


def state_tensors(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Every tensor of the optimizer's state dict, in a fixed order."""
    state = opt.state_dict()["state"]
    return [state[i][k].clone() for i in sorted(state) for k in sorted(state[i])]


def all_equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


# ------------------------------------------------------------------------ DDP
def _ddp_worker(rank: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    x, y = regression_data(seed=rank)  # different data on each rank
    result = {}
    for name, sync in (("ddp", True), ("no_sync", False)):
        model = DDP(mlp(seed=0))
        opt = NGOptimizer(model.parameters())
        for _ in range(STEPS):
            opt.zero_grad()
            # no_sync: the negative control, DDP without its gradient all-reduce
            with nullcontext() if sync else model.no_sync():
                nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        params = [p.detach().clone() for p in model.module.parameters()]
        result[name] = {"params": params, "state": state_tensors(opt)}
    return result


def test_ddp_replicas_stay_identical(tmp_path):
    """DDP, 2 ranks with different data, NGOptimizer steps: parameters and
    optimizer state are bit-identical across ranks, training changed them,
    and they match one process stepping with the ranks' averaged gradient.
    Without the gradient all-reduce (``no_sync``) the replicas differ."""
    ranks = run_workers(_ddp_worker, tmp_path)

    ddp = [r["ddp"] for r in ranks]
    assert all_equal(ddp[0]["params"], ddp[1]["params"])
    assert all_equal(ddp[0]["state"], ddp[1]["state"])
    initial = [p.detach() for p in mlp(seed=0).parameters()]
    assert not any(torch.equal(p, q) for p, q in zip(ddp[0]["params"], initial))

    control = [r["no_sync"] for r in ranks]
    assert not all_equal(control[0]["params"], control[1]["params"])
    assert not all_equal(control[0]["state"], control[1]["state"])

    # Reference: one process, gradient = mean of the ranks' gradients.
    model = mlp(seed=0)
    opt = NGOptimizer(model.parameters())
    data = [regression_data(seed=r) for r in range(WORLD)]
    for _ in range(STEPS):
        grads = []
        for x, y in data:
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            grads.append([p.grad.clone() for p in model.parameters()])
        for p, *gs in zip(model.parameters(), *grads):
            p.grad = torch.stack(gs).mean(0)
        opt.step()
    for p, q in zip(ddp[0]["params"], model.parameters()):
        torch.testing.assert_close(p, q.detach())
    for s, t in zip(ddp[0]["state"], state_tensors(opt)):
        torch.testing.assert_close(s, t)


# ---------------------------------------------------------------------- FSDP2
#: (4, 6, 3): the last layer's 3 rows shard unevenly over 2 ranks (2 + 1).
FSDP_SIZES = (4, 6, 3)


def _fsdp_worker(rank: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    model = mlp(seed=0, sizes=FSDP_SIZES)
    mesh = init_device_mesh("cpu", (WORLD,))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    assert all(isinstance(p, DTensor) for p in model.parameters())
    opt = NGOptimizer(model.parameters())
    x, y = regression_data(seed=0)  # the same data on every rank
    losses = train(model, opt, x, y, STEPS)
    state = state_tensors(opt)
    reloaded = NGOptimizer(model.parameters())
    reloaded.load_state_dict(opt.state_dict())
    return {
        "params": [p.full_tensor() for p in model.parameters()],
        "local": [p.to_local().clone() for p in model.parameters()],
        "state": state,
        "reloaded_state": state_tensors(reloaded),
        "losses": losses,
    }


def test_fsdp2_matches_unsharded_training(tmp_path):
    """FSDP2 ``fully_shard`` (DTensor parameters, uneven shards), same data on
    both ranks: NGOptimizer gives the same parameters, state and losses as one
    unsharded process, each rank holds its own shard of them, the replicated
    state is bit-identical across ranks and survives a state_dict round trip."""
    ranks = run_workers(_fsdp_worker, tmp_path)

    model = mlp(seed=0, sizes=FSDP_SIZES)
    initial = [p.detach().clone() for p in model.parameters()]
    opt = NGOptimizer(model.parameters())
    losses = train(model, opt, *regression_data(seed=0), STEPS)
    expected = [p.detach() for p in model.parameters()]

    assert all_equal(ranks[0]["state"], ranks[1]["state"])
    assert all_equal(ranks[0]["params"], ranks[1]["params"])
    for rank, result in enumerate(ranks):
        for p, q in zip(result["params"], expected):
            torch.testing.assert_close(p, q)
        for s, t in zip(result["state"], state_tensors(opt)):
            torch.testing.assert_close(s, t)
        torch.testing.assert_close(result["losses"], losses)
        assert all_equal(result["reloaded_state"], result["state"])
        # Shard(0) follows torch.chunk: rank r holds chunk r of the rows.
        shards = [p.chunk(WORLD, dim=0)[rank] for p in result["params"]]
        assert all_equal(result["local"], shards)
    assert not any(torch.equal(p, q) for p, q in zip(expected, initial))
    assert [p.shape[0] for p in ranks[1]["local"]] == [3, 3, 1, 1]
