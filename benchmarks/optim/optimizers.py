"""The optimizers compared: ``NGOptimizer``, the hand-designed baselines and
the untuned peers.

An :class:`OptimizerConfig` names an optimizer and its learning rate and builds
it for a parameter list. Baselines are tuned over a log-spaced learning-rate
grid per task (:func:`lr_grid`); the learned optimizer is never tuned, and
neither are the peers (:data:`PEERS`): other optimizers that need no learning
rate tuning, run at their authors' recommended defaults. The peers come from
third-party packages (the ``bench`` extra), imported only when one is built.

Some peers are read at other weights than the ones their gradients are taken
at: Schedule-Free AdamW at its averaged ``x`` sequence, LDoG at a
polynomial-decay average of its iterates. :meth:`OptimizerConfig.evaluation`
gives the :class:`EvalWeights` that says which weights to evaluate.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import MappingProxyType, ModuleType
from typing import Any

import numpy as np
import torch
from torch import nn

from benchmarks.common.report import format_lr
from lopt import NGOptimizer, UpdateRule, default_rule_path, load_rule
from lopt.tasks.loop import EvalWeights

__all__ = [
    "NG",
    "UNTRAINED",
    "BASELINES",
    "PEERS",
    "PEER_SPECS",
    "BENCH_INSTALL",
    "DISPLAY_NAMES",
    "GRID_RANGES",
    "ADAMW_WEIGHT_DECAY",
    "SGD_MOMENTUM",
    "MissingPeerError",
    "PeerSpec",
    "EvalWeights",
    "OptimizerConfig",
    "lr_grid",
    "load_ng_rule",
    "parse_peers",
    "check_peers",
    "peer_version",
]

#: Name of the learned optimizer.
NG = "ng"
#: Its untrained ablation: the rule's config with fresh weights (Adam plus the
#: step-size controller), the floor the learned part must beat.
UNTRAINED = "untrained"
#: Tunable baselines, in table order.
BASELINES = ("adam", "adamw", "sgd")
#: How to install the peers' packages.
BENCH_INSTALL = "pip install -e '.[bench]'"


@dataclass(frozen=True)
class PeerSpec:
    """An untuned peer optimizer from a third-party package.

    Attributes:
        display: name in tables and plots.
        module: the package's import name.
        distribution: its name on PyPI (for versions and install hints).
        factory: the optimizer class in ``module``.
        kwargs: constructor arguments besides the parameters (the recommended
            defaults; empty means the package's own defaults).
        evaluated_at: which weights are evaluated (held-out metric and the
            recorded train loss): ``"params"`` (the trained weights),
            ``"schedulefree_x"`` (``optimizer.eval()``'s averaged ``x``) or
            ``"polynomial_average"`` (``dog.PolynomialDecayAverager``).
    """

    display: str
    module: str
    distribution: str
    factory: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    evaluated_at: str = "params"

    def __post_init__(self):
        # Frozen all the way down: specs are shared module-level constants.
        object.__setattr__(self, "kwargs", MappingProxyType(dict(self.kwargs)))

    def settings(self) -> dict[str, Any]:
        """JSON-ready description (also part of the run cache's key)."""
        return {
            "class": f"{self.module}.{self.factory}",
            "kwargs": dict(self.kwargs),
            "evaluated_at": self.evaluated_at,
        }


#: Untuned peers, in table order, each at its recommended defaults:
#: Prodigy at ``lr=1.0`` ("Leave LR set to 1"), Schedule-Free AdamW at its
#: defaults (lr 0.0025, no warmup) evaluated at ``x`` (``optimizer.eval()``),
#: LDoG at its defaults with the polynomial-decay iterate averaging its authors
#: call crucial ("DoG/L-DoG must be combined with iterate averaging").
PEER_SPECS: Mapping[str, PeerSpec] = MappingProxyType(
    {
        "prodigy": PeerSpec(
            "Prodigy", "prodigyopt", "prodigyopt", "Prodigy", {"lr": 1.0}
        ),
        "schedulefree": PeerSpec(
            "SF-AdamW",
            "schedulefree",
            "schedulefree",
            "AdamWScheduleFree",
            evaluated_at="schedulefree_x",
        ),
        "ldog": PeerSpec(
            "LDoG", "dog", "dog-optimizer", "LDoG", evaluated_at="polynomial_average"
        ),
    }
)
#: Names of the peers, in table order.
PEERS = tuple(PEER_SPECS)
#: Names used in tables and plots.
DISPLAY_NAMES = {
    NG: "NG",
    UNTRAINED: "NG untrained",
    "adam": "Adam",
    "adamw": "AdamW",
    "sgd": "SGD-m",
    **{name: spec.display for name, spec in PEER_SPECS.items()},
}
#: Log10 range ``(low, high)`` of each baseline's learning-rate grid.
GRID_RANGES = {"adam": (-4.0, 0.0), "adamw": (-4.0, 0.0), "sgd": (-3.0, 1.0)}
#: AdamW's decoupled weight decay (PyTorch's default).
ADAMW_WEIGHT_DECAY = 1e-2
#: SGD's heavy-ball momentum.
SGD_MOMENTUM = 0.9


class MissingPeerError(ImportError):
    """A peer's package is not installed (the message says how to install it)."""


def _import_peer(name: str) -> ModuleType:
    spec = PEER_SPECS[name]
    try:
        return importlib.import_module(spec.module)
    except ImportError as err:
        raise MissingPeerError(
            f"The peer optimizer {spec.display} needs the package "
            f"{spec.distribution!r} (import {spec.module!r} failed: {err}); install "
            f"the bench extra: {BENCH_INSTALL}, or leave it out with --peers"
        ) from err


def peer_version(name: str) -> str | None:
    """Installed version of a peer's package (``None`` when not installed)."""
    try:
        return importlib.metadata.version(PEER_SPECS[name].distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def parse_peers(text: str | None) -> tuple[str, ...]:
    """``--peers``: ``"all"`` (or ``None``), ``"none"`` or comma-separated names.

    Raises:
        ValueError: an unknown name.
    """
    if text is None or text.strip() == "all":
        return PEERS
    if text.strip() in ("none", ""):
        return ()
    names = tuple(dict.fromkeys(v.strip() for v in text.split(",") if v.strip()))
    unknown = [n for n in names if n not in PEER_SPECS]
    if unknown:
        raise ValueError(
            f"Invalid peer: {', '.join(map(repr, unknown))} "
            f"(known: {', '.join(PEERS)}, all, none)"
        )
    return tuple(n for n in PEERS if n in names)


def check_peers(peers: Sequence[str]) -> dict[str, str | None]:
    """Import every peer's package now (fail before any run) and return the
    versions.

    Raises:
        MissingPeerError: a package is missing (names the ``bench`` extra).
    """
    for name in peers:
        _import_peer(name)
    return {name: peer_version(name) for name in peers}


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


def untrained_like(rule: UpdateRule) -> UpdateRule:
    """``rule``'s architecture and step-size controller with fresh weights: its
    learned output is zero, so it steps as Adam scaled by the controller.
    Drawn without touching torch's global random stream."""
    with torch.random.fork_rng(devices=[]):
        return UpdateRule(rule.config, rule.step_size)


class ScheduleFreeEval(EvalWeights):
    """Schedule-Free: the optimizer in train mode for steps, in eval mode (its
    ``x`` sequence in the parameters) for every evaluation, as its docs ask."""

    averaged = True

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        super().__init__(model)
        self.optimizer = optimizer

    def start(self) -> None:
        self.optimizer.train()

    @contextmanager
    def weights(self) -> Iterator[nn.Module]:
        self.optimizer.eval()
        try:
            yield self.model
        finally:
            self.optimizer.train()


class AveragerEval(EvalWeights):
    """An iterate averager stepped after each optimizer step; its averaged
    copy of the model is what is evaluated (LDoG's ``PolynomialDecayAverager``).

    Args:
        model: the model being trained.
        averager: has ``step()`` and ``averaged_model``.
    """

    averaged = True

    def __init__(self, model: nn.Module, averager: Any):
        super().__init__(model)
        self.averager = averager

    def after_step(self) -> None:
        self.averager.step()

    @contextmanager
    def weights(self) -> Iterator[nn.Module]:
        yield self.averager.averaged_model


@dataclass(frozen=True)
class OptimizerConfig:
    """One optimizer at one learning rate.

    Attributes:
        name: ``"ng"``, one of :data:`BASELINES` or one of :data:`PEERS`.
        lr: learning rate; ``None`` for the learned optimizer and the peers
            (their defaults, see :data:`PEER_SPECS`).
    """

    name: str
    lr: float | None = None

    def __post_init__(self):
        if self.name not in (NG, UNTRAINED, *BASELINES, *PEERS):
            raise ValueError(f"Invalid optimizer: {self.name!r}")
        if self.name in BASELINES and self.lr is None:
            raise ValueError(f"Invalid learning rate: {self.lr}")
        if self.name in (*PEERS, UNTRAINED) and self.lr is not None:
            raise ValueError(
                f"Invalid learning rate: {self.lr} ({self.name} runs at its defaults)"
            )

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

        Raises:
            MissingPeerError: a peer whose package is not installed.
        """
        if self.name == NG:
            return NGOptimizer(params, rule=rule if rule is not None else "default")
        if self.name == UNTRAINED:
            return NGOptimizer(params, rule=untrained_like(rule or load_ng_rule()))
        if self.name in PEER_SPECS:
            spec = PEER_SPECS[self.name]
            factory = getattr(_import_peer(self.name), spec.factory)
            return factory(params, **spec.kwargs)
        if self.name == "adam":
            return torch.optim.Adam(params, lr=self.lr)
        if self.name == "adamw":
            return torch.optim.AdamW(
                params, lr=self.lr, weight_decay=ADAMW_WEIGHT_DECAY
            )
        return torch.optim.SGD(params, lr=self.lr, momentum=SGD_MOMENTUM)

    def evaluation(
        self, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> EvalWeights:
        """Which weights of ``model`` trained by ``optimizer`` (from
        :meth:`build`) are evaluated; see :attr:`PeerSpec.evaluated_at`."""
        spec = PEER_SPECS.get(self.name)
        if spec is None or spec.evaluated_at == "params":
            return EvalWeights(model)
        if spec.evaluated_at == "schedulefree_x":
            return ScheduleFreeEval(model, optimizer)
        if spec.evaluated_at == "polynomial_average":
            averager = _import_peer(self.name).PolynomialDecayAverager(model)
            return AveragerEval(model, averager)
        raise AssertionError(f"unknown evaluated_at: {spec.evaluated_at!r}")
