"""Distil a rule into another rule architecture (usually a cheaper one).

``python -m meta_train.distill --teacher full --out runs/lean
--rule '{"edge_mlp": false, "edge_head_hidden": 0}'``

Meta-training a rule from scratch by unrolls is slow and suffers from
short-horizon bias; a cheaper architecture that should *behave like* a rule we
already trust can instead learn to imitate it. The teacher trains tasks sampled
from the task family; along each run, optimizer snapshots ``(params, grads,
state)`` are kept at log-spaced steps, so early and late training both count.
The student (initialised by :func:`~meta_train.trainer.transplant` from the
teacher wherever the architectures agree) is then fitted by Adam to the
teacher's update on each snapshot. The loss is the squared error of the update
relative to the teacher's update size, per tensor:

    mean over snapshots and tensors of  ||u_student - u_teacher||^2 / ||u_teacher||^2

so a small bias update and a large weight matrix count the same, as they do
for training. Held-out snapshots (other tasks) report the same loss; the
student with the lowest held-out loss is saved as ``OUT/best_rule``, with the
teacher, the command and both losses in its provenance.

Imitation along the teacher's runs alone leaves the student's own small
errors to compound over long runs (measured: a late stall at 5000 steps the
teacher does not have). ``--rounds N`` adds N-1 rounds of DAgger: the student
drives new runs, the teacher labels their snapshots, and the student is fitted
again on everything collected so far.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lopt.graph import NeuralGraph
from lopt.optim.features import FeatureState
from lopt.optim.functional import ng_step
from lopt.optim.optimizer import resolve_rule
from lopt.optim.rule import UpdateRule, load_rule, save_rule
from lopt.optim.step_size import split_legacy_fields
from lopt.tasks.families import MLPFamily, TaskConfig
from meta_train.evaluate import rule_trajectory
from meta_train.trainer import transplant

__all__ = ["Snapshot", "collect_snapshots", "relative_update_error", "distil", "main"]


@dataclass
class Snapshot:
    """One optimizer state of a teacher run and the teacher's update there."""

    graph: NeuralGraph
    params: torch.Tensor  # (P,) before the step
    grads: torch.Tensor  # (P,)
    state: FeatureState  # before the step
    target: torch.Tensor  # (P,) the teacher's update (new params - params)
    segments: torch.Tensor  # (P,) index of each scalar's tensor


def _snapshot_steps(horizon: int, count: int) -> set[int]:
    """About ``count`` log-spaced step indices in ``[0, horizon)``."""
    points = torch.logspace(0, math.log10(horizon), count)
    return {min(int(p) - 1, horizon - 1) for p in points}


@torch.no_grad()
def collect_snapshots(
    teacher: UpdateRule,
    configs: list[TaskConfig],
    horizons: list[int],
    per_task: int = 12,
    progress: bool = True,
    driver: UpdateRule | None = None,
) -> list[Snapshot]:
    """Train each task for its horizon and keep ``per_task`` log-spaced
    snapshots with ``teacher``'s update as target (a run whose loss turns
    non-finite stops early).

    ``driver`` (default: the teacher) is the rule whose updates advance the
    runs. Driving with the student visits the states the student will see,
    where its small errors have compounded, and labels them with what the
    teacher would do there (DAgger), which imitation along the teacher's own
    runs never shows it."""
    driver = teacher if driver is None else driver
    snapshots = []
    bar = tqdm(list(zip(configs, horizons)), desc="teacher runs", disable=not progress)
    for config, horizon in bar:
        keep = _snapshot_steps(horizon, per_task)
        segments = None
        for step, run in enumerate(rule_trajectory(driver, config, horizon)):
            if not (math.isfinite(run.loss) and torch.isfinite(run.grads).all()):
                break
            if step not in keep:
                continue
            if segments is None:
                segments = torch.repeat_interleave(
                    torch.arange(len(run.graph.numels)), run.graph.segment_lengths
                )
            new, _ = ng_step(teacher, run.graph, run.params, run.grads, run.state)
            snapshots.append(
                Snapshot(
                    run.graph, run.params, run.grads, run.state, new - run.params,
                    segments,
                )
            )  # fmt: skip
    return snapshots


def relative_update_error(rule: UpdateRule, snap: Snapshot) -> torch.Tensor:
    """Per-tensor ``||u - u_teacher||^2 / ||u_teacher||^2``, averaged over the
    snapshot's tensors; differentiable in ``rule``'s weights."""
    new, _ = ng_step(rule, snap.graph, snap.params, snap.grads, snap.state)
    err = (new - snap.params - snap.target).square()
    n = len(snap.graph.numels)
    num = torch.zeros(n, dtype=err.dtype).index_add(0, snap.segments, err)
    den = torch.zeros(n, dtype=err.dtype).index_add(
        0, snap.segments, snap.target.square()
    )
    return (num / (den + 1e-20)).mean()


def _mean_error(rule: UpdateRule, snapshots: list[Snapshot]) -> float:
    with torch.no_grad():
        return sum(float(relative_update_error(rule, s)) for s in snapshots) / max(
            len(snapshots), 1
        )


def distil(
    student: UpdateRule,
    train: list[Snapshot],
    val: list[Snapshot],
    iterations: int,
    lr: float = 1e-3,
    batch: int = 4,
    val_every: int = 100,
    seed: int = 0,
    progress: bool = True,
) -> tuple[UpdateRule, list[dict]]:
    """Fit ``student`` to the teacher's updates held by the ``train``
    snapshots.

    Returns the student with the lowest held-out error (the starting one
    included) and the log: one row per validation, ``{"iteration",
    "train_error", "val_error"}``.
    """
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, iterations, lr / 10)
    best = _mean_error(student, val)
    best_state = {k: v.clone() for k, v in student.state_dict().items()}
    log = [{"iteration": 0, "train_error": math.nan, "val_error": best}]
    running = []
    bar = tqdm(range(1, iterations + 1), desc="distil", disable=not progress)
    for it in bar:
        picks = torch.randint(len(train), (batch,), generator=gen).tolist()
        loss = sum(relative_update_error(student, train[i]) for i in picks) / batch
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        sched.step()
        running.append(float(loss.detach()))
        if it % val_every == 0 or it == iterations:
            val_error = _mean_error(student, val)
            log.append(
                {
                    "iteration": it,
                    "train_error": sum(running) / len(running),
                    "val_error": val_error,
                }
            )
            running = []
            bar.set_postfix(val=f"{val_error:.4f}", best=f"{best:.4f}")
            if val_error < best:
                best = val_error
                best_state = {k: v.clone() for k, v in student.state_dict().items()}
    student.load_state_dict(best_state)
    return student, log


def _tasks(family: MLPFamily, count: int, seed: int, horizon: tuple[int, int]):
    gen = torch.Generator().manual_seed(seed)
    configs = [family.sample(gen) for _ in range(count)]
    low, high = math.log(horizon[0]), math.log(horizon[1])
    horizons = [
        int(math.exp(low + (high - low) * float(torch.rand((), generator=gen))))
        for _ in configs
    ]
    return configs, horizons


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m meta_train.distill", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--teacher",
        default="full",
        help="a shipped rule's name (lopt.SHIPPED_RULES) or a rule directory",
    )
    parser.add_argument("--out", required=True)
    parser.add_argument(
        "--rule", default="{}", help="RuleConfig overrides of the student (JSON)"
    )
    parser.add_argument("--tasks", type=int, default=48, help="teacher runs to fit")
    parser.add_argument("--val-tasks", type=int, default=12)
    parser.add_argument("--per-task", type=int, default=12, help="snapshots per run")
    parser.add_argument("--horizon", default="100,3000", help="steps per run, LOW,HIGH")
    parser.add_argument("--widths", default="16,32,64,128,256")
    parser.add_argument("--iterations", type=int, default=2000, help="per round")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="rounds after the first add snapshots of the student's own runs",
    )
    parser.add_argument(
        "--student", help="start from this saved student instead of a transplant"
    )
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    try:
        overrides = json.loads(args.rule)
        low, high = (int(v) for v in args.horizon.split(","))
        widths = tuple(int(w) for w in args.widths.split(","))
    except ValueError as err:
        parser.error(f"invalid --rule, --horizon or --widths: {err}")
    if not isinstance(overrides, dict):
        parser.error("--rule must be a JSON object of RuleConfig fields")
    if not 1 <= low <= high:
        parser.error(f"invalid --horizon {args.horizon}: need 1 <= LOW <= HIGH")
    if args.rounds < 1 or args.iterations < 1:
        parser.error("--rounds and --iterations must be at least 1")
    teacher = resolve_rule(args.teacher)
    # The student keeps the teacher's step-size controller unless --rule
    # overrides it (by the controller's old step_adapt_* field names).
    overrides, step_overrides = split_legacy_fields(overrides)
    config = replace(teacher.config, **overrides)
    step_size = replace(teacher.step_size, **step_overrides)
    if args.student:
        student = load_rule(args.student)
        if (student.config, student.step_size) != (config, step_size):
            parser.error(
                f"--student {args.student} has config {student.config} and step "
                f"size {student.step_size}, not the requested {config}, {step_size}"
            )
    else:
        student = transplant(teacher, config, step_size)
    family = MLPFamily(widths=widths)
    progress = not args.no_progress
    train: list[Snapshot] = []
    log: list[dict] = []
    for round_ in range(args.rounds):
        # Round 0 follows the teacher's runs (unless a trained student is
        # given); later rounds add the student's own runs, teacher-labelled.
        driver = student if (round_ or args.student) else None
        seed = args.seed + 1000 * round_
        cfg, hor = _tasks(family, args.tasks, seed, (low, high))
        train += collect_snapshots(teacher, cfg, hor, args.per_task, progress, driver)
        cfg, hor = _tasks(family, args.val_tasks, seed + 10_000, (low, high))
        val = collect_snapshots(teacher, cfg, hor, args.per_task, progress, driver)
        student, rows = distil(
            student,
            train,
            val,
            args.iterations,
            lr=args.lr,
            seed=seed,
            progress=progress,
        )
        log += [{"round": round_, **row} for row in rows]
        print(
            f"round {round_}: relative update error on held-out snapshots "
            f"{rows[0]['val_error']:.3e} -> {min(r['val_error'] for r in rows):.3e}",
            flush=True,
        )
    out = Path(args.out)
    words = argv if argv is not None else sys.argv[1:]
    out.mkdir(parents=True, exist_ok=True)
    (out / "log.json").write_text(json.dumps(log, indent=1))
    last = [row for row in log if row["round"] == args.rounds - 1]
    best = min(last, key=lambda row: row["val_error"])
    save_rule(
        student,
        out / "best_rule",
        {
            "command": "python -m meta_train.distill " + shlex.join(words),
            "distilled_from": dict(teacher.metadata),
            "teacher_path": str(args.teacher),
            "distillation": {
                "rounds": args.rounds,
                "iteration": best["iteration"],
                "val_relative_update_error": best["val_error"],
                "start_val_relative_update_error": last[0]["val_error"],
                "train_snapshots": len(train),
                "val_snapshots": len(val),
            },
        },
    )
    print(
        "relative update error on held-out snapshots of the last round: "
        f"start {last[0]['val_error']:.3e}, "
        f"best {best['val_error']:.3e} (iteration {best['iteration']}); "
        f"saved {out / 'best_rule'}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
