"""Fingerprints of the shipped rules' trajectories on the held-out suite.

    python -m benchmarks.optim.fingerprint [--steps 300] [--out FILE] [--compare FILE]

For a change that must not alter what the optimizer computes (a refactor, a
new file layout, a faster kernel claimed exact), run it before and after:
each rule x suite task is trained from seed 0 for ``--steps`` steps with
``NGOptimizer`` (the default, fast path) and hashed (SHA-256 of the final
weights' bytes and of every recorded loss). ``--compare`` exits 1 when any
fingerprint differs from a saved file's. Bit-identity holds on one machine
and torch build; another CPU or BLAS may round differently.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch

from lopt import SHIPPED_RULES, NGOptimizer
from lopt.tasks.loop import ModuleLearner, run
from lopt.tasks.suite import get_tasks

__all__ = ["fingerprints", "main"]


def fingerprints(steps: int, rules=SHIPPED_RULES, tasks=None) -> dict[str, str]:
    """``{"rule/task": hex digest}`` of each run of ``steps`` steps."""
    out = {}
    for rule in rules:
        for task in get_tasks(tasks):
            model = task.make_model(0)
            opt = NGOptimizer(model.parameters(), rule=rule)
            curve = run(task, ModuleLearner(model, opt), steps, task.batch_generator(0))
            digest = hashlib.sha256()
            for p in model.parameters():
                digest.update(p.detach().cpu().contiguous().numpy().tobytes())
            digest.update(repr(curve.losses).encode())
            out[f"{rule}/{task.name}"] = digest.hexdigest()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.optim.fingerprint",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--tasks", help="comma-separated suite tasks (default: all)")
    parser.add_argument("--out", help="write the fingerprints to this JSON file")
    parser.add_argument("--compare", help="JSON file of fingerprints to compare with")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"Invalid --steps: {args.steps} (need >= 1)")
    torch.set_num_threads(args.threads)
    tasks = args.tasks.split(",") if args.tasks else None
    found = fingerprints(args.steps, tasks=tasks)
    result = {"steps": args.steps, "torch": torch.__version__, "runs": found}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    if not args.compare:
        for name, digest in found.items():
            print(f"{name:40s} {digest[:16]}")
        return 0
    saved = json.loads(Path(args.compare).read_text())
    if saved.get("steps") != args.steps:
        parser.error(f"{args.compare} has {saved.get('steps')} steps, not {args.steps}")
    differ = [n for n in found if saved["runs"].get(n) != found[n]]
    for name in found:
        print(f"{name:40s} {'DIFFERS' if name in differ else 'same'}")
    print(f"{len(found) - len(differ)}/{len(found)} runs bit-identical")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
