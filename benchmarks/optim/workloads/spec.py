"""What a workload is: a training job people run, with a held-out split and
the metric its users read.

A :class:`Workload` makes a :class:`Job` for a seed: the model (built from
the seed), a stream of training batches (its own generator, so every
optimizer sees the same data), the train loss, a held-out evaluation, and the
parameter groups the job's users write (weight decay on matrices, none on
biases, norms and embeddings) and the hidden matrices Muon is meant for.
Optimizer recipes (:mod:`.recipes`) and the runner (:mod:`.runner`) know
nothing else about the job.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["Job", "Workload", "SETTINGS", "workload", "split_decay", "hidden_matrices"]


@dataclass
class Job:
    """One seeded instance of a workload.

    Attributes:
        model: the network, freshly initialised from the seed.
        next_batch: draws the next training batch (deterministic in the seed).
        loss: ``(model, batch) -> scalar`` train loss (the model in train mode).
        evaluate: ``model -> {"val_loss": ..., <metric>: ...}`` on the held-out
            split (called in eval mode under ``torch.no_grad()``).
        decay, no_decay: the model's parameters split the way the job's users
            group them (every parameter in exactly one).
        matrices: the hidden 2-D weight matrices (Muon's share; never the
            embeddings, the output head or any 1-D parameter).
    """

    model: nn.Module
    next_batch: Callable[[], Any]
    loss: Callable[[nn.Module, Any], torch.Tensor]
    evaluate: Callable[[nn.Module], dict[str, float]]
    decay: list[nn.Parameter]
    no_decay: list[nn.Parameter]
    matrices: list[nn.Parameter]


@dataclass(frozen=True)
class Workload:
    """A training job and how it is run and judged.

    Attributes:
        name: identifier on the command line and in tables.
        description: one line for tables.
        metric: the held-out number users read (a key of ``evaluate``'s dict;
            ``"val_loss"`` or e.g. ``"accuracy"``).
        higher_is_better: direction of ``metric``.
        steps: training steps of a full run; ``quick_steps`` of a ``--quick`` one.
        eval_every: steps between held-out evaluations (and at the end).
        weight_decay: the decay group's weight decay (every optimizer gets it).
        clip: global gradient-norm clip of the training script (``None``: none).
        make: ``(seed, quick) -> Job``; ``quick`` may also shrink the job.
    """

    name: str
    description: str
    metric: str
    higher_is_better: bool
    steps: int
    quick_steps: int
    eval_every: int
    weight_decay: float
    make: Callable[[int, bool], Job]
    clip: float | None = None
    quick_eval_every: int | None = None
    tags: Sequence[str] = field(default_factory=tuple)

    def total_steps(self, quick: bool) -> int:
        return self.quick_steps if quick else self.steps

    def eval_interval(self, quick: bool) -> int:
        if quick and self.quick_eval_every:
            return self.quick_eval_every
        return self.eval_every


def split_decay(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """The usual grouping (nanoGPT, timm): weight decay on parameters with two
    or more dimensions, none on biases, norm gains and other 1-D parameters.
    Embedding tables are 2-D and decayed, as nanoGPT does."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return decay, no_decay


def hidden_matrices(
    model: nn.Module, exclude: Sequence[nn.Module] = ()
) -> list[nn.Parameter]:
    """2-D weights of ``nn.Linear`` layers outside the modules in ``exclude``
    (embeddings, the output head): the parameters Muon's authors apply it to.
    ``torch.optim.Muon`` takes 2-D parameters only, so conv kernels stay with
    AdamW."""
    skip = {id(p) for m in exclude for p in m.parameters()}
    out = []
    for module in model.modules():
        if isinstance(module, nn.Linear):
            w = module.weight
            if w.requires_grad and id(w) not in skip:
                out.append(w)
    return out


#: How each workload is run and judged, one line each: metric,
#: higher_is_better, steps, quick_steps, eval_every, quick_eval_every,
#: weight_decay, clip (the training script's; ``None``: no clip).
SETTINGS: dict[str, tuple] = {
    "gpt": ("val_loss", False, 1500, 100, 100, 25, 0.1, 1.0),
    "resnet": ("accuracy", True, 800, 80, 100, 20, 5e-4, None),
    "lstm": ("val_loss", False, 1500, 100, 100, 25, 0.01, 1.0),
    "vit": ("accuracy", True, 800, 100, 100, 25, 0.05, 1.0),
    "finetune": ("accuracy", True, 500, 60, 50, 20, 1e-2, None),
    "tabular": ("accuracy", True, 1500, 100, 100, 25, 1e-2, None),
}


def workload(name: str, description: str, make: Callable[[int, bool], Job]) -> Workload:
    """The :class:`Workload` ``name`` with its :data:`SETTINGS`."""
    metric, higher, steps, quick, every, quick_every, decay, clip = SETTINGS[name]
    return Workload(
        name,
        description,
        metric,
        higher,
        steps,
        quick,
        every,
        decay,
        make,
        clip,
        quick_eval_every=quick_every,
    )
