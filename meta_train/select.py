"""Pick a rule among candidates on meta-validation tasks, stability first.

``python -m meta_train.select RULE_DIR [RULE_DIR ...] [--tasks N] [--steps S]``
trains ``N`` tasks sampled from a task family (by default the MLP family widened
to 256 units, never the benchmark suite) for ``S`` steps with each rule and with
Adam(1e-3), and ranks the rules by divergences (loss above 10x its start, or
non-finite), then by the mean ``log(L_final / L_0)`` (final = mean of the last
10% of steps). Checkpoint selection by the short validation inside meta-training
missed rules that blow up late on wider networks; this is the longer check.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import torch

from lopt.optim.rule import load_rule
from lopt.tasks.families import MLPFamily, TaskConfig, describe
from meta_train.evaluate import final_log_ratio, loss_curve

__all__ = ["run_task", "main", "FAMILIES"]

#: Task families of ``--family``, as overrides of :class:`MLPFamily`.
FAMILIES = {
    "mlp": {},
    "broad": {"min_depth": 0, "recurrent_prob": 0.3, "unscaled_prob": 0.25},
    # Deep MLPs (5-8 hidden layers), where a step that cannot shrink below the
    # rule's own lets the loss climb late in long runs (experiment 17).
    "deep": {"min_depth": 5, "max_depth": 8, "conv_prob": 0.0},
}


def run_task(
    rule, config: TaskConfig, steps: int, orthogonal: bool = False
) -> tuple[bool, float]:
    """Train one task; returns ``(diverged, log(L_final / L_0))`` with a
    diverged run scored ``log 10``. ``rule=None`` runs Adam(1e-3).
    ``orthogonal``: the rule's hidden-matrix updates orthogonalised, as
    ``NGOptimizer`` does by default."""
    losses, diverged = loss_curve(
        rule, config, steps, stop_above=10.0, orthogonal=orthogonal
    )
    return diverged, final_log_ratio(losses, diverged)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m meta_train.select", description=__doc__
    )
    parser.add_argument("rules", nargs="+", help="rule directories")
    parser.add_argument("--tasks", type=int, default=6)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=30_000)
    parser.add_argument("--max-width", type=int, default=256)
    parser.add_argument(
        "--task-seeds",
        type=int,
        default=1,
        help="run each task from this many seeds (its own, then +1000, +2000, ...): "
        "a late stall on one seed of one task can flip between two close rules",
    )
    parser.add_argument(
        "--family",
        choices=sorted(FAMILIES),
        default="mlp",
        help="task family: 'mlp' (MLPs and 1-D CNNs, the meta-training family "
        "widened) or 'broad' (also linear models, GRUs and LSTMs, and unscaled "
        "inputs: what the rule is worst at, none of them the benchmark suite's) "
        "or 'deep' (MLPs of 5-8 hidden layers)",
    )
    parser.add_argument(
        "--orthogonal",
        action="store_true",
        help="orthogonalise the rules' hidden-matrix updates (NGOptimizer's "
        "default; off by default here, as in meta-training)",
    )
    parser.add_argument("--no-adam", action="store_true", help="skip Adam(1e-3)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    widths = tuple(w for w in (16, 32, 64, 128, 256, 512) if w <= args.max_width)
    gen = torch.Generator().manual_seed(args.seed)
    if args.task_seeds < 1:
        parser.error(f"invalid --task-seeds {args.task_seeds}: need at least 1")
    family = MLPFamily(widths=widths, **FAMILIES[args.family])
    sampled = [family.sample(gen) for _ in range(args.tasks)]
    configs = [
        replace(c, seed=c.seed + 1000 * k)
        for c in sampled
        for k in range(args.task_seeds)
    ]
    for c in configs:
        print(f"task: {describe(c)}")
    rows = []
    for name in [*([] if args.no_adam else ["adam(1e-3)"]), *args.rules]:
        rule = None if name == "adam(1e-3)" else load_rule(name)
        results = [run_task(rule, c, args.steps, args.orthogonal) for c in configs]
        diverged = sum(d for d, _ in results)
        score = sum(s for _, s in results) / len(results)
        rows.append((diverged, score, name))
        print(
            f"{name}: diverged {diverged}/{len(configs)}, mean log(L_final/L_0) "
            f"{score:.3f} ({', '.join(f'{s:.2f}' for _, s in results)})",
            flush=True,
        )
    print("\nranking (divergences, then score):")
    for diverged, score, name in sorted(rows):
        print(f"  {name}: {diverged} diverged, {score:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
