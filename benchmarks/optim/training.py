"""One benchmark run: a task, an optimizer, a seed and a step budget.

A run records the train loss of every step, stops early when it diverges
(non-finite loss, or a loss above ``divergence_factor`` times the first step's
loss) and evaluates the held-out metric at the end. The loop itself is
:func:`lopt.tasks.loop.run` (with a :class:`~lopt.tasks.loop.ModuleLearner`),
shared with meta-training's validation.

Optimizers whose result is read at other weights than those their gradients
are taken at (Schedule-Free's ``x``, LDoG's averaged iterates; see
:class:`benchmarks.optim.optimizers.EvalWeights`) are evaluated there: the held-out
metric, and each step's recorded train loss (the same minibatch, evaluated at
those weights without gradient before the training forward pass). Their curves,
final losses and speedups are thus those of the weights their authors say to
use.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from benchmarks.optim.optimizers import OptimizerConfig
from lopt import UpdateRule
from lopt.tasks.loop import ModuleLearner, run
from lopt.tasks.task import Task

__all__ = ["DIVERGENCE_FACTOR", "RunResult", "train"]

#: A run diverges when its loss exceeds this multiple of its initial loss.
DIVERGENCE_FACTOR = 10.0


@dataclass
class RunResult:
    """Outcome of one training run.

    Attributes:
        task: task name.
        optimizer: the optimizer and learning rate.
        seed: model-initialisation and batch-order seed.
        steps: the step budget.
        losses: train loss of each completed step (shorter than ``steps`` if
            the run diverged), at the evaluated weights (see the module).
        diverged: whether the run was stopped for divergence.
        diverged_at: the step (1-based) at which it was stopped.
        held_out: ``{"metric": ..., "loss": ...}`` on the held-out split
            (``nan`` for diverged runs).
        wall_s: wall-clock seconds of the training loop (evaluation excluded,
            also the extra loss evaluation at averaged weights).
        error: ``"Type: message"`` of an exception that ended the run (set by
            :func:`benchmarks.optim.protocol.execute`, which records it and goes on).
    """

    task: str
    optimizer: OptimizerConfig
    seed: int
    steps: int
    losses: list[float] = field(default_factory=list)
    diverged: bool = False
    diverged_at: int | None = None
    held_out: dict[str, float] = field(default_factory=dict)
    wall_s: float = 0.0
    error: str | None = None

    @property
    def completed(self) -> bool:
        """Whether the run went through its whole budget (no divergence, no error)."""
        return not self.diverged and self.error is None

    @property
    def ms_per_step(self) -> float:
        """Mean wall-clock milliseconds per completed step."""
        return 1e3 * self.wall_s / max(len(self.losses), 1)


def train(
    task: Task,
    optimizer: OptimizerConfig,
    steps: int,
    seed: int,
    *,
    rule: UpdateRule | None = None,
    divergence_factor: float = DIVERGENCE_FACTOR,
) -> RunResult:
    """Train ``task``'s model from seed ``seed`` for ``steps`` steps.

    The same ``seed`` gives the same initial weights and the same batches for
    every optimizer, so runs are paired across optimizers.

    Args:
        task: the problem.
        optimizer: which optimizer, at which learning rate.
        steps: number of optimizer steps.
        seed: run seed.
        rule: the learned rule for ``NGOptimizer`` (``None``: the default).
        divergence_factor: stop when the loss exceeds this multiple of the
            first step's loss.
    """
    model = task.make_model(seed)
    opt = optimizer.build(model.parameters(), rule)
    evaluation = optimizer.evaluation(model, opt)
    learner = ModuleLearner(model, opt, evaluation)
    generator = task.batch_generator(seed)
    result = RunResult(task.name, optimizer, seed, steps)
    start = time.perf_counter()
    evaluation.start()
    curve = run(task, learner, steps, generator, divergence_factor=divergence_factor)
    result.wall_s = time.perf_counter() - start - learner.evaluation_s
    result.losses = curve.losses
    result.diverged, result.diverged_at = curve.diverged, curve.diverged_at
    if result.diverged:
        result.held_out = {"metric": math.nan, "loss": math.nan}
    else:
        with evaluation.weights() as evaluated:
            result.held_out = task.evaluate(evaluated)
    return result
