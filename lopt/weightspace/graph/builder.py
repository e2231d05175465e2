"""Accumulates the nodes, edges and parameter placements of one neural graph.

Both ways of reading a network's structure (``torch.fx`` tracing and shape
inference) describe it to a :class:`GraphBuilder` in the same terms (groups of
neurons, blocks of edges with their kernels, state_dict tensors placed on
nodes or edges), so the two produce identical graphs wherever both apply, and
the parameter map is written in one place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lopt.tracing import Unsupported
from lopt.weightspace.graph.data import (
    ACTIVATIONS,
    LAYER_TYPES,
    NODE_FEATURES,
    NODE_ROLES,
    NeuralGraphData,
    ParamSpec,
)

__all__ = ["GraphBuilder", "Unsupported"]


@dataclass
class _EdgeBlock:
    src: torch.Tensor  # (n,) node ids
    dst: torch.Tensor  # (n,) node ids
    kernels: torch.Tensor  # (n, *kernel) float: the weights of each edge
    type: int  # LAYER_TYPES index
    name: str | None  # state_dict key of the weights, None for identity edges


@dataclass
class GraphBuilder:
    """Builds one :class:`~lopt.weightspace.graph.data.NeuralGraphData`.

    Args:
        state: the floating-point state_dict entries, in state_dict order;
            each must be placed exactly once (on nodes or as edge weights).
    """

    state: dict[str, torch.Tensor]
    num_nodes: int = 0
    _role: list[int] = field(default_factory=list)
    _type: list[int] = field(default_factory=list)
    _layer: list[int] = field(default_factory=list)
    _pos: list[int] = field(default_factory=list)
    _acts: list[tuple[torch.Tensor, int]] = field(default_factory=list)
    _blocks: list[_EdgeBlock] = field(default_factory=list)
    # state_dict key -> (nodes, column) for node-held tensors
    _node_params: dict[str, tuple[torch.Tensor, int]] = field(default_factory=dict)
    # state_dict key -> index in _blocks for edge-held tensors
    _edge_params: dict[str, int] = field(default_factory=dict)
    _occupied: set[tuple[int, int]] = field(default_factory=set)  # (node, column)
    # (fx node name, neurons its output holds along dim 1), in trace order
    _values: list[tuple[str, torch.Tensor]] = field(default_factory=list)

    # ------------------------------------------------------------- nodes
    def add_nodes(
        self, count: int, role: str, layer_type: str, layer: int
    ) -> torch.Tensor:
        """``count`` new neurons; input neurons are numbered 0..count-1 in
        ``node_pos``, all others get -1 (outputs are numbered by
        :meth:`finish`)."""
        ids = torch.arange(self.num_nodes, self.num_nodes + count)
        self.num_nodes += count
        self._role += [NODE_ROLES.index(role)] * count
        self._type += [LAYER_TYPES.index(layer_type)] * count
        self._layer += [layer] * count
        self._pos += list(range(count)) if role == "input" else [-1] * count
        return ids

    def layer_of(self, nodes: torch.Tensor) -> int:
        """The depth of the deepest of ``nodes``."""
        return max((self._layer[i] for i in nodes.tolist()), default=0)

    def role_of(self, nodes: torch.Tensor) -> set[str]:
        return {NODE_ROLES[self._role[i]] for i in nodes.tolist()}

    def set_activation(self, nodes: torch.Tensor, activation: str) -> None:
        """Record the nonlinearity applied to ``nodes`` (the first recorded
        for a node wins: a later one acts on the same, already activated
        values, as in ``relu`` then ``dropout``)."""
        self._acts.append((nodes, ACTIVATIONS.index(activation)))

    def place_on_nodes(self, name: str, nodes: torch.Tensor, column: str) -> None:
        """State_dict entry ``name`` (one value per node) is column ``column``
        (:data:`NODE_FEATURES`) of ``nodes``."""
        self._check_new(name)
        if self.state[name].shape != (len(nodes),):
            raise Unsupported(
                f"{name} of shape {tuple(self.state[name].shape)} does not fit "
                f"{len(nodes)} neurons"
            )
        column_id = NODE_FEATURES.index(column)
        cells = {(node, column_id) for node in nodes.tolist()}
        if cells & self._occupied:
            raise Unsupported(f"{name} lands on neurons that already have a {column}")
        self._occupied |= cells
        self._node_params[name] = (nodes, column_id)

    def add_standalone(self, name: str) -> None:
        """Each scalar of ``name`` becomes an isolated node holding it as its
        bias: every entry keeps a place, with no structure."""
        numel = self.state[name].numel()
        nodes = self.add_nodes(numel, "standalone", "standalone", 0)
        self._check_new(name)
        self._occupied |= {(node, 0) for node in nodes.tolist()}
        self._node_params[name] = (nodes, 0)

    def place_rest(self) -> None:
        """Make every state_dict entry not placed yet standalone nodes."""
        for name in self.state:
            if name not in self._node_params and name not in self._edge_params:
                self.add_standalone(name)

    def record_value(self, name: str, nodes: torch.Tensor) -> None:
        """The output of traced node ``name`` holds ``nodes`` along dim 1 (in
        that order). For each neuron the last such record wins: it is the
        neuron's value after everything the graph folds into it (activation,
        norm, residual sum), which :mod:`lopt.weightspace.models.probes` reads."""
        self._values.append((name, nodes))

    # ------------------------------------------------------------- edges
    def add_edges(
        self,
        src: torch.Tensor,
        dst: torch.Tensor,
        kernels: torch.Tensor,
        layer_type: str,
        name: str | None = None,
    ) -> None:
        """Edges ``src[j] -> dst[j]`` carrying ``kernels[j]`` (shape
        ``(n, *kernel)``). With ``name``, the kernels are that state_dict
        entry's values in its own order (edge-major, tap-minor)."""
        if name is not None:
            self._check_new(name)
            if kernels.numel() != self.state[name].numel():
                raise Unsupported(f"{name} does not fit {len(src)} edges")
            self._edge_params[name] = len(self._blocks)
        block = _EdgeBlock(src, dst, kernels, LAYER_TYPES.index(layer_type), name)
        self._blocks.append(block)

    def _check_new(self, name: str) -> None:
        if name in self._node_params or name in self._edge_params:
            raise Unsupported(f"{name} is used twice (shared weights)")

    # ------------------------------------------------------------- finish
    def kernel_shape(self) -> tuple[int, ...]:
        """The smallest shape every edge's kernel fits in (centred)."""
        shapes = [tuple(b.kernels.shape[1:]) for b in self._blocks]
        ndim = max((len(s) for s in shapes), default=0)
        full = [(1,) * (ndim - len(s)) + s for s in shapes]
        return tuple(max((s[d] for s in full), default=1) for d in range(ndim))

    def finish(
        self,
        outputs: torch.Tensor | None,
        kernel_shape: tuple[int, ...] | None = None,
    ) -> NeuralGraphData:
        """The graph, with ``outputs`` as its output neurons and every kernel
        zero-padded (centred) to ``kernel_shape`` (default: the smallest that
        fits, :meth:`kernel_shape`). Every state_dict entry must be placed
        (:meth:`place_rest`). Does not change the builder, so one builder can
        be finished with several kernel shapes."""
        unplaced = [
            n for n in self.state if n not in self._node_params | self._edge_params
        ]
        if unplaced:
            raise ValueError(f"state_dict entries not placed: {unplaced[:5]}")
        natural = self.kernel_shape()
        kernel_shape = _check_kernel_shape(natural, kernel_shape)
        width = math.prod(kernel_shape)

        role = torch.tensor(self._role, dtype=torch.long)
        pos = torch.tensor(self._pos, dtype=torch.long)
        if outputs is not None and len(outputs):
            role[outputs] = NODE_ROLES.index("output")
            pos[outputs] = torch.arange(len(outputs))
        act = torch.zeros(self.num_nodes, dtype=torch.long)
        for nodes, value in reversed(self._acts):
            act[nodes] = value

        fx_values, node_fx, node_channel = self._value_map()

        x = torch.zeros(self.num_nodes, len(NODE_FEATURES))
        node_pos: dict[str, torch.Tensor] = {}
        for name, (nodes, column) in self._node_params.items():
            x[nodes, column] = self.state[name].detach().reshape(-1).float()
            node_pos[name] = nodes * len(NODE_FEATURES) + column

        edge_attr, edge_pos, offset = [], {}, 0
        for block in self._blocks:
            padded, taps = _pad_kernels(block.kernels.detach().float(), kernel_shape)
            edge_attr.append(padded.reshape(len(padded), width))
            if block.name is not None:
                edges = torch.arange(offset, offset + len(padded))
                edge_pos[block.name] = (edges[:, None] * width + taps).reshape(-1)
            offset += len(padded)

        layout = tuple(
            ParamSpec(
                name,
                tuple(value.shape),
                str(value.dtype).removeprefix("torch."),
                "node" if name in node_pos else "edge",
            )
            for name, value in self.state.items()
        )
        names = [spec.name for spec in layout]
        empty = torch.zeros(0, dtype=torch.long)
        param_node_pos = torch.cat(
            [node_pos[n] for n in names if n in node_pos] or [empty]
        )
        tensor_of = {name: i for i, name in enumerate(names)}

        def cat(parts, dtype=torch.long):
            return torch.cat(parts) if parts else torch.zeros(0, dtype=dtype)

        return NeuralGraphData(
            x=x,
            edge_index=torch.stack(
                [cat([b.src for b in self._blocks]), cat([b.dst for b in self._blocks])]
            ),
            edge_attr=cat(edge_attr, torch.float32).reshape(-1, width),
            node_role=role,
            node_type=torch.tensor(self._type, dtype=torch.long),
            node_act=act,
            node_layer=torch.tensor(self._layer, dtype=torch.long),
            node_pos=pos,
            edge_type=cat([torch.full((len(b.src),), b.type) for b in self._blocks]),
            edge_tensor=cat(
                [
                    torch.full((len(b.src),), tensor_of.get(b.name, -1))
                    for b in self._blocks
                ]
            ),
            param_node_pos=param_node_pos,
            param_edge_pos=cat([edge_pos[n] for n in names if n in edge_pos]),
            param_layout=layout,
            kernel_shape=kernel_shape,
            node_fx=node_fx,
            node_channel=node_channel,
            fx_values=fx_values,
            num_nodes=self.num_nodes,
        )

    def _value_map(self) -> tuple[tuple[str, ...], torch.Tensor, torch.Tensor]:
        """The traced nodes that hold neuron values, and for each neuron the
        one that holds its final value (-1: none) and its channel there."""
        node_fx = torch.full((self.num_nodes,), -1, dtype=torch.long)
        node_channel = torch.full((self.num_nodes,), -1, dtype=torch.long)
        names: dict[str, int] = {}
        for name, nodes in self._values:
            node_fx[nodes] = names.setdefault(name, len(names))
            node_channel[nodes] = torch.arange(len(nodes))
        used = set(node_fx.unique().tolist())
        kept = [n for n, i in names.items() if i in used]
        renumber = torch.full((len(names) + 1,), -1, dtype=torch.long)
        for new, name in enumerate(kept):
            renumber[names[name]] = new
        return tuple(kept), renumber[node_fx], node_channel


def _check_kernel_shape(
    natural: tuple[int, ...], requested: tuple[int, ...] | None
) -> tuple[int, ...]:
    if requested is None:
        return natural
    requested = tuple(int(k) for k in requested)
    fits = len(requested) >= len(natural) and all(
        r >= n for r, n in zip(requested[len(requested) - len(natural) :], natural)
    )
    if not fits:
        raise ValueError(
            f"kernel_size {requested} is smaller than this network needs, "
            f"{natural} (its largest conv kernel or flattened feature map)"
        )
    return requested


def _pad_kernels(
    kernels: torch.Tensor, shape: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad ``(n, *k)`` kernels to ``(n, *shape)``, centred (the smaller
    half of the padding before, as in the paper's code), so that a 1x1 kernel
    or a linear weight sits at the centre tap, where an identity kernel has its
    one. Returns the padded kernels and, for each original tap in row-major
    order, its index in the flattened padded kernel."""
    k = tuple(kernels.shape[1:])
    k = (1,) * (len(shape) - len(k)) + k
    kernels = kernels.reshape(len(kernels), *k)
    taps = torch.arange(1, math.prod(k) + 1).reshape(k)
    pad: list[int] = []
    for size, target in zip(reversed(k), reversed(shape)):
        before = (target - size) // 2
        pad += [before, target - size - before]
    if pad:
        kernels, taps = F.pad(kernels, pad), F.pad(taps, pad)
    return kernels, taps.reshape(-1).nonzero().reshape(-1)
