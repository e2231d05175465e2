"""A split of networks as data: what every weight-space predictor and the
training harness read (:class:`WeightSpaceData`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from lopt.weightspace.graph.data import NODE_ROLES, NeuralGraphData
from lopt.weightspace.graph.dataset import NeuralGraphDataset
from lopt.weightspace.graph.screening import SkippedNetwork

__all__ = ["WeightSpaceData", "float_state", "stack_deltas"]


def float_state(module: nn.Module, state: Mapping[str, torch.Tensor] | None = None):
    """The floating-point entries of ``state`` (default: the module's own) in
    the module's ``state_dict`` key order (integer buffers such as
    ``num_batches_tracked`` are left out)."""
    own = module.state_dict()
    state = own if state is None else state
    missing = [k for k in own if k not in state]
    if missing:
        raise ValueError(f"state_dict lacks entries of its module: {missing[:5]}")
    return {k: state[k] for k in own if own[k].is_floating_point()}


@dataclass
class WeightSpaceData:
    """The networks of one split and what the tasks read of them.

    Attributes:
        graphs: one :class:`~lopt.weightspace.NeuralGraphData` per network.
        state_dicts: each network's floating-point state_dict entries, in its
            module's key order.
        modules: each network's architecture (a module whose weights
            ``state_dicts`` replaces; networks may share one object).
        y: ``(n,)`` labels: int64 classes or float targets; ``None`` for
            editing.
        target: editing only: ``(n, P)`` the outputs the edited network should
            give at the ``P`` inputs of ``grid``.
        grid: editing only: ``(P, d)`` network inputs (an INR's coordinates).
        extras: other per-network tensors ``(n, ...)`` that predictors may
            read, e.g. ``"image"``: the signal an INR was fitted to.
        skipped: the networks :meth:`from_modules` left out with
            ``on_bad="skip"`` (their positions in what it was given).
    """

    graphs: list[NeuralGraphData]
    state_dicts: list[dict[str, torch.Tensor]]
    modules: list[nn.Module]
    y: torch.Tensor | None = None
    target: torch.Tensor | None = None
    grid: torch.Tensor | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    skipped: list[SkippedNetwork] = field(default_factory=list)

    def __post_init__(self):
        n = len(self.graphs)
        if n == 0:
            raise ValueError("WeightSpaceData needs at least one network")
        for name in ("state_dicts", "modules"):
            if len(getattr(self, name)) != n:
                raise ValueError(
                    f"got {len(getattr(self, name))} {name} for {n} graphs"
                )
        for name, value in (("y", self.y), ("target", self.target)):
            if value is not None and len(value) != n:
                raise ValueError(f"got {len(value)} {name} for {n} graphs")
        for name, value in self.extras.items():
            if len(value) != n:
                raise ValueError(f"extras[{name!r}] has {len(value)} rows for {n}")
        if (self.target is None) != (self.grid is None):
            raise ValueError("editing data needs both target and grid")

    @classmethod
    def from_modules(
        cls,
        modules: Sequence[nn.Module],
        labels: Sequence | torch.Tensor | None = None,
        *,
        state_dicts: Sequence[Mapping[str, torch.Tensor]] | None = None,
        kernel_size: Sequence[int] | None = None,
        target: torch.Tensor | None = None,
        grid: torch.Tensor | None = None,
        extras: Mapping[str, torch.Tensor] | None = None,
        on_bad: str = "raise",
    ) -> WeightSpaceData:
        """Build the graphs of ``modules`` (or of ``state_dicts`` loaded into
        them) with :class:`~lopt.weightspace.NeuralGraphDataset`. Pass the
        training split's ``kernel_size`` to the other splits.

        ``on_bad``: a network with a NaN or infinite entry raises a
        ``ValueError`` naming it (``"network I"``, its position), or with
        ``"skip"`` is left out, with its label, target and extras rows, and
        listed in :attr:`skipped` (with a warning). The modules, state_dicts
        and tensors passed in are not modified.
        """
        modules = list(modules)
        dataset = NeuralGraphDataset(
            modules,
            labels,
            state_dicts=state_dicts,
            kernel_size=kernel_size,
            names=[f"network {i}" for i in range(len(modules))],
            on_bad=on_bad,
        )
        kept = dataset.kept
        states = [
            float_state(modules[i], state_dicts[i] if state_dicts is not None else None)
            for i in kept
        ]
        y = None if labels is None else torch.as_tensor(labels)
        extras = dict(extras or {})
        if dataset.skipped:
            # Every per-network tensor loses the skipped rows (checked for
            # length first, so a mismatch is named, not an IndexError).
            for name, value in (("target", target), *extras.items()):
                if value is not None and len(value) != len(modules):
                    raise ValueError(
                        f"got {len(value)} {name} rows for {len(modules)} networks"
                    )
            rows = torch.as_tensor(kept, dtype=torch.long)
            y = None if y is None else y[rows]
            target = None if target is None else target[rows]
            extras = {k: v[rows] for k, v in extras.items()}
        return cls(
            [dataset[i] for i in range(len(dataset))],
            [{k: v.detach() for k, v in s.items()} for s in states],
            [modules[i] for i in kept],
            y,
            target,
            grid,
            extras,
            list(dataset.skipped),
        )

    def __len__(self) -> int:
        return len(self.graphs)

    @property
    def edge_features(self) -> int:
        """``F_edge`` of the graphs (the NG models' ``edge_features``)."""
        return int(self.graphs[0].edge_attr.shape[1])

    @property
    def output_neurons(self) -> int:
        """The most output neurons of any network (what an ``"output"``
        readout must read, see
        :func:`lopt.weightspace.models.readout.output_neurons`)."""
        out = NODE_ROLES.index("output")
        return max(
            int(g.node_pos[g.node_role == out].max()) + 1
            if bool((g.node_role == out).any())
            else 0
            for g in self.graphs
        )

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return tuple(self.graphs[0].kernel_shape)

    def subset(self, index: Sequence[int]) -> WeightSpaceData:
        """The networks ``index``, in that order."""
        index = list(index)
        rows = torch.as_tensor(index, dtype=torch.long)
        return WeightSpaceData(
            [self.graphs[i] for i in index],
            [self.state_dicts[i] for i in index],
            [self.modules[i] for i in index],
            None if self.y is None else self.y[rows],
            None if self.target is None else self.target[rows],
            self.grid,
            {k: v[rows] for k, v in self.extras.items()},
        )

    def stacked_state(self, index: Sequence[int]) -> dict[str, torch.Tensor]:
        """``{name: (B, *shape)}`` for networks ``index``, which must share
        one architecture (the same keys and shapes)."""
        states = [self.state_dicts[i] for i in index]
        keys = list(states[0])
        for i, state in zip(index, states):
            if list(state) != keys or any(
                state[k].shape != states[0][k].shape for k in keys
            ):
                raise ValueError(
                    f"network {i} has another architecture than network "
                    f"{index[0]}; this predictor needs one architecture"
                )
        return {k: torch.stack([s[k] for s in states]) for k in keys}


def stack_deltas(deltas: Sequence[Mapping[str, torch.Tensor]]):
    """``{name: (B, *shape)}`` from one delta dict per network."""
    return {k: torch.stack([d[k] for d in deltas]) for k in deltas[0]}
