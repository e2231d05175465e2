"""Trace one workload run: held-out metric, the step-size controller's log
steps and the relative size of the updates, every ``--every`` steps.

    python -m benchmarks.optim.workloads.trace --workload gpt --recipe ng
        [--lr LR] [--steps N] [--every 100] [--log-min X] [--out FILE]

For diagnosis, not ranking: ``--log-min`` overrides the NG rule's
``StepSizeConfig.log_min`` (the floor of its log step multipliers) to test
whether a run under-steps. Each line is JSON: ``step``, ``train_loss``, the
evaluation, training ``seconds``, ``log_step`` as ``[min, mean, max]`` over
tensors (NG recipes), and ``rel_update`` as ``[min, median, max]`` over
tensors of ``|p_new - p| / |p|`` (RMS over each tensor).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from benchmarks.optim.workloads import WORKLOAD_NAMES, get_workloads
from benchmarks.optim.workloads.recipes import RECIPES, Recipe, Trainer

__all__ = ["main", "trace"]


def trace(workload, recipe: Recipe, steps: int, every: int, log_min=None, seed=0):
    """Yield one dict per traced step (see the module docstring)."""
    job = workload.make(seed, False)
    trainer = Trainer(recipe, job, workload, steps)
    opt = trainer.optimizers[0]
    if log_min is not None:
        if not recipe.name.startswith("ng"):
            raise ValueError(f"--log-min applies to the NG recipes, not {recipe.name}")
        opt.rule.step_size = dataclasses.replace(opt.rule.step_size, log_min=log_min)
    params = [p for p in job.model.parameters() if p.requires_grad]
    seconds = 0.0
    for step in range(1, steps + 1):
        traced = step == 1 or step % every == 0 or step == steps
        before = [p.detach().clone() for p in params] if traced else None
        job.model.train()
        start = time.perf_counter()
        trainer.zero_grad()
        loss = job.loss(job.model, job.next_batch())
        loss.backward()
        trainer.step()
        seconds += time.perf_counter() - start
        if not traced:
            continue
        rel = sorted(
            float(
                (p.detach() - b).pow(2).mean().sqrt() / (b.pow(2).mean().sqrt() + 1e-12)
            )
            for p, b in zip(params, before)
        )
        job.model.eval()
        with torch.no_grad(), trainer.evaluation():
            result = job.evaluate(job.model)
        row = {"step": step, "train_loss": float(loss.detach()), **result}
        row["seconds"] = round(seconds, 2)
        if recipe.name.startswith("ng"):
            logs = [
                float(opt.state[p]["log_step"])
                for p in params
                if "log_step" in opt.state[p]
            ]
            if logs:
                row["log_step"] = [min(logs), sum(logs) / len(logs), max(logs)]
        row["rel_update"] = [rel[0], rel[len(rel) // 2], rel[-1]]
        yield row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.optim.workloads.trace",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--workload", required=True, choices=WORKLOAD_NAMES)
    parser.add_argument("--recipe", required=True, choices=RECIPES)
    parser.add_argument("--lr", type=float, help="learning rate of a tuned recipe")
    parser.add_argument("--steps", type=int, help="default: the workload's full steps")
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--log-min", type=float, help="override NG's log-step floor")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", help="also write the JSON lines to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    (workload,) = get_workloads([args.workload])
    try:
        recipe = Recipe(args.recipe, args.lr)
        rows = trace(
            workload,
            recipe,
            args.steps or workload.steps,
            args.every,
            args.log_min,
            args.seed,
        )
        out = Path(args.out).open("w") if args.out else None
        for row in rows:
            line = json.dumps(row)
            print(line, flush=True)
            if out:
                out.write(line + "\n")
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
