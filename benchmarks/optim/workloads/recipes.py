"""The optimizers compared on the workloads, each set up as its users do.

- ``adamw``: AdamW with linear warmup (5% of the steps) and cosine decay to
  zero, on the job's decay / no-decay groups; its learning rate is tuned on a
  grid per workload.
- ``muon``: ``torch.optim.Muon`` on the hidden 2-D matrices and AdamW on
  everything else (embeddings, head, biases, norms, conv kernels), both with
  the same warmup + cosine shape; Muon's learning rate on a small grid around
  the recommended 0.02, the AdamW part at 1e-3 (scaled by the same factor
  when the grid moves).
- ``schedulefree``: Schedule-Free AdamW at its defaults, evaluated at its
  ``x`` sequence (``optimizer.eval()``), as its docs ask.
- ``prodigy``: Prodigy at ``lr=1.0``, its default.
- ``ng``: ``NGOptimizer`` untuned (the shipped rule) on the job's groups,
  told the run's length (``total_steps``, as the cosine schedules are), its
  defaults otherwise (orthogonalised hidden matrices, guessed from the
  parameter order).
- ``ng_untrained``: the shipped rule's config with fresh weights: Adam plus
  the step-size controller. The learned part must beat it to earn its cost.

Every optimizer gets the job's weight decay on its decay group and the
training script's gradient clip.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from benchmarks.optim.optimizers import load_ng_rule, untrained_like
from benchmarks.optim.workloads.spec import Job, Workload
from lopt import NGOptimizer, UpdateRule

__all__ = [
    "RECIPES",
    "STRUCTURES",
    "TUNED",
    "DISPLAY",
    "NotApplicable",
    "Recipe",
    "Trainer",
    "lr_grid",
]

#: Recipes in table order.
RECIPES = ("ng", "ng_untrained", "adamw", "muon", "schedulefree", "prodigy")
#: Where the NG recipes' neural graph comes from (``Trainer``'s ``structure``).
STRUCTURES = ("groups", "model", "named", "traced")
#: Recipes whose learning rate is tuned per workload.
TUNED = ("adamw", "muon")
DISPLAY = {
    "ng": "NG",
    "ng_untrained": "NG untrained",
    "adamw": "AdamW+cos*",
    "muon": "Muon+AdamW*",
    "schedulefree": "SF-AdamW",
    "prodigy": "Prodigy",
}
#: Learning-rate grids (full, quick) of the tuned recipes.
GRIDS = {
    "adamw": ((3e-4, 1e-3, 3e-3, 1e-2), (1e-3, 3e-3)),
    "muon": ((0.01, 0.02, 0.05), (0.02,)),
}
WARMUP_FRACTION = 0.05
MUON_ADAMW_LR = 1e-3  # the AdamW part of Muon + AdamW, at Muon lr 0.02


def lr_grid(recipe: str, quick: bool) -> tuple[float | None, ...]:
    """The learning rates a recipe runs at (``(None,)`` for untuned ones)."""
    if recipe not in RECIPES:
        raise ValueError(f"Invalid recipe: {recipe!r} (known: {', '.join(RECIPES)})")
    if recipe not in TUNED:
        return (None,)
    return GRIDS[recipe][1 if quick else 0]


def warmup_cosine(total: int) -> torch.optim.lr_scheduler.LambdaLR | None:
    """The multiplier of step ``t``: linear warmup, then cosine to zero."""
    warmup = max(1, int(WARMUP_FRACTION * total))

    def factor(t: int) -> float:
        if t < warmup:
            return (t + 1) / warmup
        progress = (t - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


@dataclass(frozen=True)
class Recipe:
    """A recipe and, for the tuned ones, its learning rate."""

    name: str
    lr: float | None = None

    def __post_init__(self):
        lr_grid(self.name, False)  # validates the name
        if (self.name in TUNED) != (self.lr is not None):
            raise ValueError(f"Invalid learning rate for {self.name}: {self.lr}")

    @property
    def label(self) -> str:
        return DISPLAY[self.name] + ("" if self.lr is None else f"@{self.lr:g}")


class NotApplicable(ValueError):
    """The recipe does not apply to the job (Muon on a job without hidden
    2-D matrices: ``torch.optim.Muon`` takes 2-D parameters only, so a CNN's
    conv kernels are not its own). Such a run is skipped, not faked with
    another optimizer."""


class Trainer:
    """The optimizers of one run, their schedules, and which weights are
    evaluated (:meth:`evaluation`)."""

    def __init__(
        self,
        recipe: Recipe,
        job: Job,
        workload: Workload,
        total: int,
        rule: UpdateRule | None = None,
        structure: str = "groups",
    ):
        """``rule``: the NG recipes' rule (default: the shipped one; for
        ``ng_untrained``, the rule whose config gets fresh weights).
        ``structure``: where the NG recipes' neural graph comes from: the
        groups' order (``"groups"``), ``model=`` (``"model"``), the
        parameters' names (``"named"``) or the model's fx trace
        (``"traced"``: ``model=``, ``graph="traced"``)."""
        if structure not in STRUCTURES:
            raise ValueError(f"Invalid structure: {structure!r}")
        self.recipe = recipe
        self.optimizers: list[torch.optim.Optimizer] = []
        self.schedulers: list[torch.optim.lr_scheduler.LRScheduler] = []
        self.params = [p for p in job.model.parameters() if p.requires_grad]
        self.clip = workload.clip
        wd = workload.weight_decay
        groups = [
            {"params": job.decay, "weight_decay": wd},
            {"params": job.no_decay, "weight_decay": 0.0},
        ]
        groups = [g for g in groups if g["params"]]
        name = recipe.name
        if name == "adamw":
            opt = torch.optim.AdamW(groups, lr=recipe.lr)
            self._schedule(opt, total)
        elif name == "muon":
            if not job.matrices:
                raise NotApplicable(f"{workload.name} has no hidden 2-D matrices")
            matrices = {id(p) for p in job.matrices}
            rest = [
                {**g, "params": [p for p in g["params"] if id(p) not in matrices]}
                for g in groups
            ]
            muon = torch.optim.Muon(job.matrices, lr=recipe.lr, weight_decay=wd)
            adamw = torch.optim.AdamW(
                [g for g in rest if g["params"]],
                lr=MUON_ADAMW_LR * recipe.lr / 0.02,
            )
            self._schedule(muon, total)
            self._schedule(adamw, total)
        elif name == "schedulefree":
            import schedulefree

            opt = schedulefree.AdamWScheduleFree(groups)
            opt.train()
            self.optimizers.append(opt)
        elif name == "prodigy":
            import prodigyopt

            self.optimizers.append(prodigyopt.Prodigy(groups, lr=1.0))
        else:  # ng; ng_untrained: the shipped config with fresh weights
            if name == "ng_untrained":
                rule = untrained_like(rule or load_ng_rule())
            model = job.model if structure in ("model", "traced") else None
            if structure == "named":
                names = {id(p): n for n, p in job.model.named_parameters()}
                groups = [
                    {**g, "params": [(names[id(p)], p) for p in g["params"]]}
                    for g in groups
                ]
            self.optimizers.append(
                NGOptimizer(
                    groups,
                    rule=rule or "default",
                    total_steps=total,
                    model=model,
                    graph="traced" if structure == "traced" else "shapes",
                )
            )

    def _schedule(self, opt: torch.optim.Optimizer, total: int) -> None:
        self.optimizers.append(opt)
        self.schedulers.append(
            torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(total))
        )

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def step(self) -> None:
        if self.clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        for opt in self.optimizers:
            opt.step()
        for sched in self.schedulers:
            sched.step()

    @contextmanager
    def evaluation(self):
        """The ``with`` block in which the model holds the weights to evaluate
        (Schedule-Free's ``x``; the trained weights otherwise)."""
        sf = self.recipe.name == "schedulefree"
        if sf:
            self.optimizers[0].eval()
        try:
            yield
        finally:
            if sf:
                self.optimizers[0].train()
