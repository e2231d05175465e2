"""The optimizers compared: ``NGOptimizer`` and the hand-designed baselines.

An :class:`OptimizerConfig` names an optimizer and its learning rate and builds
it for a parameter list. Baselines are tuned over a log-spaced learning-rate
grid per task (:func:`lr_grid`); the learned optimizer is never tuned.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from benchmarks.report import format_lr
from lopt import NGOptimizer, UpdateRule, default_rule_path, load_rule

__all__ = [
    "NG",
    "BASELINES",
    "DISPLAY_NAMES",
    "GRID_RANGES",
    "ADAMW_WEIGHT_DECAY",
    "SGD_MOMENTUM",
    "OptimizerConfig",
    "lr_grid",
    "load_ng_rule",
]

#: Name of the learned optimizer.
NG = "ng"
#: Tunable baselines, in table order.
BASELINES = ("adam", "adamw", "sgd")
#: Names used in tables and plots.
DISPLAY_NAMES = {NG: "NG", "adam": "Adam", "adamw": "AdamW", "sgd": "SGD-m"}
#: Log10 range ``(low, high)`` of each baseline's learning-rate grid.
GRID_RANGES = {"adam": (-4.0, 0.0), "adamw": (-4.0, 0.0), "sgd": (-3.0, 1.0)}
#: AdamW's decoupled weight decay (PyTorch's default).
ADAMW_WEIGHT_DECAY = 1e-2
#: SGD's heavy-ball momentum.
SGD_MOMENTUM = 0.9


def lr_grid(name: str, points: int) -> tuple[float, ...]:
    """``points`` log-spaced learning rates spanning the baseline's range.

    The ranges span four decades (Adam / AdamW ``1e-4 .. 1``, SGD ``1e-3 ..
    10``), wide enough that the best rate is rarely on an edge: with 9 points
    the grid is half-decade spaced (``1e-4, 3.2e-4, ..., 1``), with 5 it is
    every other point of that grid (decades). With 0 points the baseline is not
    tuned (not run).
    """
    if name not in GRID_RANGES:
        raise ValueError(f"Invalid optimizer: {name!r} (known: {list(GRID_RANGES)})")
    if points < 0:
        raise ValueError(f"Invalid grid size: {points}")
    if points == 0:
        return ()
    low, high = GRID_RANGES[name]
    if points == 1:
        return (float(10 ** ((low + high) / 2)),)
    return tuple(float(f"{v:.3g}") for v in np.logspace(low, high, points))


def load_ng_rule(rule: str | os.PathLike | None = None) -> UpdateRule:
    """Load the learned rule once (``None`` means the rule shipped with lopt).

    Raises:
        ValueError: no readable rule at ``rule`` (the message says why).
    """
    try:
        return load_rule(default_rule_path() if rule is None else rule)
    except FileNotFoundError as err:
        raise ValueError(f"Invalid rule: {err}") from err


@dataclass(frozen=True)
class OptimizerConfig:
    """One optimizer at one learning rate.

    Attributes:
        name: ``"ng"`` or one of :data:`BASELINES`.
        lr: learning rate; ``None`` for the learned optimizer (its default).
    """

    name: str
    lr: float | None = None

    def __post_init__(self):
        if self.name != NG and self.name not in BASELINES:
            raise ValueError(f"Invalid optimizer: {self.name!r}")
        if self.name != NG and self.lr is None:
            raise ValueError(f"Invalid learning rate: {self.lr}")

    @property
    def label(self) -> str:
        """Short human-readable form, e.g. ``"Adam(1e-3)"``."""
        display = DISPLAY_NAMES[self.name]
        return display if self.lr is None else f"{display}({format_lr(self.lr)})"

    def build(
        self, params: Iterable[torch.nn.Parameter], rule: UpdateRule | None = None
    ) -> torch.optim.Optimizer:
        """Instantiate the optimizer over ``params``.

        Args:
            params: the model's parameters.
            rule: the learned rule (loaded once by the caller and shared by
                every run; ``None`` loads the default rule).
        """
        if self.name == NG:
            return NGOptimizer(params, rule=rule if rule is not None else "default")
        if self.name == "adam":
            return torch.optim.Adam(params, lr=self.lr)
        if self.name == "adamw":
            return torch.optim.AdamW(
                params, lr=self.lr, weight_decay=ADAMW_WEIGHT_DECAY
            )
        return torch.optim.SGD(params, lr=self.lr, momentum=SGD_MOMENTUM)
