"""Neural graphs: neurons are nodes, weights are edges.

A :class:`NeuralGraph` is built **once** from an ordered list of parameter shapes
by shape inference. Every scalar of every parameter is assigned to exactly one
of two kinds of graph element:

* an **edge** (a scalar weight of a tensor with two or more dimensions), which
  connects an input neuron (``src``) to an output neuron (``dst``) and carries
  its kernel offset as a static attribute;
* a **node slot** (a scalar of a 1-D tensor that belongs to a layer: bias, norm
  scale, norm shift, ...), or a **standalone** node for anything that matches
  nothing (scalars, unmatched vectors).

Everything is stored as flat index tensors over one flat vector of all ``P``
scalars in **graph order**: the tensors that hold edges first, then the tensors
that hold node slots (each tensor is wholly one or the other). Edge ``j`` is
scalar ``j`` and slot ``s`` is scalar ``E + s``, so splitting per-scalar values
into edges and slots is slicing, not gathering. Per-scalar values are kept
channel-major, ``(C, P)``: on a CPU, elementwise work and small matrix products
over long contiguous rows are several times faster than over ``(P, C)``.

Shape inference rules:

* a tensor of shape ``(out, in, *kernel)`` is a layer with ``out`` new nodes.
  Its inputs are the previous layer's output nodes when ``in`` equals their
  count, a flatten of them when ``in`` is a multiple of it (input feature ``i``
  maps to node ``i // (in / prev_out)``), and fresh input nodes otherwise;
* a 1-D tensor whose length equals the current layer's width is a node slot of
  that layer's nodes; the k-th such vector after a layer gets slot type ``k``;
* anything else becomes standalone nodes, one per scalar.

No learned per-index information is attached to hidden neurons, so permuting
the hidden neurons of a network permutes the graph and nothing else.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import NamedTuple

import torch

__all__ = [
    "NeuralGraph",
    "EdgeDegree",
    "edge_degree",
    "NODE_ROLES",
    "NUM_SLOT_TYPES",
    "STANDALONE_SLOT",
    "EDGE_ATTR_DIM",
    "NODE_ATTR_DIM",
]


class EdgeDegree(NamedTuple):
    """What mean aggregation needs to know of a graph beyond its edges:
    depends on ``edge_index`` only, so callers may compute it once."""

    fan_in: torch.Tensor  # (|V|,) int64: edges where the node is dst
    fan_out: torch.Tensor  # (|V|,) int64: edges where the node is src
    #: Edges are ordered by dst, so fan-in sums are sums of consecutive runs
    #: (a segment reduction: faster on a CPU than scattering into one node
    #: after another).
    dst_sorted: bool


def edge_degree(edge_index: torch.Tensor, num_nodes: int) -> EdgeDegree:
    """The :class:`EdgeDegree` of a graph with ``num_nodes`` nodes."""
    src, dst = edge_index[0], edge_index[1]
    return EdgeDegree(
        torch.bincount(dst, minlength=num_nodes),
        torch.bincount(src, minlength=num_nodes),
        bool((dst[1:] >= dst[:-1]).all()),
    )


#: Node roles, one-hot encoded in :attr:`NeuralGraph.node_attr`.
NODE_ROLES = ("input", "hidden", "output", "standalone")
#: Slot types 0..2 are the first, second and third vector after a layer (bias,
#: norm scale, norm shift in the common orderings); later vectors share type 2.
NUM_LAYER_SLOT_TYPES = 3
#: Slot type of standalone scalars.
STANDALONE_SLOT = NUM_LAYER_SLOT_TYPES
NUM_SLOT_TYPES = NUM_LAYER_SLOT_TYPES + 1
#: Static edge attributes: kernel offset (up to 3 spatial dims, in [-1, 1]),
#: and a flag for weights that belong to a kernel of more than one tap.
MAX_KERNEL_DIMS = 3
EDGE_ATTR_DIM = MAX_KERNEL_DIMS + 1
#: Static node attributes: role one-hot and relative depth in [0, 1].
NODE_ATTR_DIM = len(NODE_ROLES) + 1


@dataclass
class _Builder:
    """Accumulates index tensors while walking the parameters in order."""

    num_nodes: int = 0
    node_role: list[torch.Tensor] = field(default_factory=list)
    node_depth: list[torch.Tensor] = field(default_factory=list)
    #: One ``(inputs, outputs, kernel)`` per edge tensor: its input and output
    #: node ids and kernel shape; the edges are written out in ``_finish``.
    edge_layers: list[tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]] = field(
        default_factory=list
    )
    edge_tensors: list[int] = field(default_factory=list)
    slot_tensors: list[int] = field(default_factory=list)
    slot_node: list[torch.Tensor] = field(default_factory=list)
    slot_type: list[torch.Tensor] = field(default_factory=list)

    def add_nodes(self, count: int, role: int, depth: int) -> torch.Tensor:
        ids = torch.arange(self.num_nodes, self.num_nodes + count)
        self.num_nodes += count
        self.node_role.append(torch.full((count,), role, dtype=torch.long))
        self.node_depth.append(torch.full((count,), depth, dtype=torch.long))
        return ids


def _kernel_attr(kernel: Sequence[int]) -> torch.Tensor:
    """Static attributes of the ``prod(kernel)`` taps of one kernel, (k, 4)."""
    k = math.prod(kernel)
    attr = torch.zeros(k, EDGE_ATTR_DIM)
    if k == 1:
        return attr
    dims = list(kernel)[-MAX_KERNEL_DIMS:]
    grids = torch.meshgrid(
        *[torch.arange(d, dtype=torch.float32) for d in list(kernel)], indexing="ij"
    )
    for j, (d, grid) in enumerate(zip(dims, grids[-len(dims) :])):
        half = max((d - 1) / 2.0, 1.0)
        attr[:, j] = ((grid - (d - 1) / 2.0) / half).reshape(-1)
    attr[:, MAX_KERNEL_DIMS] = 1.0
    return attr


def _write_edges(layers) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``edge_index`` and ``kernel_attr`` of the edge tensors ``layers``
    (``(inputs, outputs, kernel)`` each), written in place into their final
    tensors by broadcasting: building a graph needs no per-edge temporaries,
    only the 16 bytes per edge it keeps (and ``kernel_attr``'s 16 where some
    kernel has more than one tap)."""
    sizes = [len(i) * len(o) * math.prod(k) for i, o, k in layers]
    edge_index = torch.empty(2, sum(sizes), dtype=torch.long)
    taps = any(math.prod(k) > 1 for _, _, k in layers)
    kernel_attr = torch.zeros(EDGE_ATTR_DIM, sum(sizes)) if taps else None
    offset = 0
    for (inputs, outputs, kernel), size in zip(layers, sizes):
        out, inn, k = len(outputs), len(inputs), math.prod(kernel)
        # Weight (o, i, t) is edge offset + (o * inn + i) * k + t, from
        # inputs[i] to outputs[o].
        part = edge_index[:, offset : offset + size]
        part[0].view(out, inn, k).copy_(inputs.view(1, inn, 1).expand(out, inn, k))
        part[1].view(out, inn * k).copy_(outputs.view(out, 1).expand(out, inn * k))
        if kernel_attr is not None and k > 1:
            attr = _kernel_attr(kernel).T  # (EDGE_ATTR_DIM, k)
            kernel_attr[:, offset : offset + size].view(-1, out * inn, k).copy_(
                attr[:, None, :].expand(-1, out * inn, k)
            )
        offset += size
    return edge_index, kernel_attr


@dataclass(frozen=True)
class NeuralGraph:
    """A network's parameters seen as a graph of neurons.

    Shapes:
        - ``edge_index``: ``(2, E)``, rows ``(src, dst)`` node ids.
        - ``kernel_attr``: ``(EDGE_ATTR_DIM, E)`` static edge attributes
          (channel-major), or ``None`` when every weight is a single-tap edge
          (the attributes would all be zero; dense models skip the memory).
          :attr:`edge_attr` always gives the full tensor.
        - ``slot_node``, ``slot_type``: ``(S,)`` node and type of each slot.
        - ``node_attr``: ``(N, NODE_ATTR_DIM)`` static node attributes.
        - ``tensor_order``: the parameter indices in graph order.
        - ``tensor_id``: ``(P,)`` parameter index of each scalar (graph order).

    ``E + S == P``: every scalar is exactly one edge or one node slot.
    ``tensor_id`` and ``slot_node`` are int32 (half the memory); ``edge_index``
    stays int64 because scatter and gather kernels on the CPU are several times
    slower with int32 indices.
    """

    shapes: tuple[torch.Size, ...]
    num_nodes: int
    tensor_order: tuple[int, ...]
    edge_index: torch.Tensor
    kernel_attr: torch.Tensor | None
    slot_node: torch.Tensor
    slot_type: torch.Tensor
    node_attr: torch.Tensor
    tensor_id: torch.Tensor

    # ------------------------------------------------------------------ build
    @classmethod
    def from_shapes(
        cls, shapes: Iterable[Sequence[int]], order: Sequence[int] | None = None
    ) -> NeuralGraph:
        """Build the graph of parameters with the given shapes.

        Args:
            shapes: the parameters' shapes; tensor ``i`` of the graph
                (:attr:`tensor_order`, :meth:`flatten`, :meth:`unflatten`)
                is ``shapes[i]``.
            order: the order in which shape inference walks the tensors (a
                permutation of their indices; default: as given). The graph's
                structure and its flat layout depend on this order only, so
                the same network listed in two orders (param groups, say)
                gets the same graph when both pass the network's own order.
        """
        shapes = tuple(torch.Size(s) for s in shapes)
        if order is None:
            order = range(len(shapes))
        elif sorted(order) != list(range(len(shapes))):
            raise ValueError(
                f"Invalid order: {list(order)} (need a permutation of "
                f"range({len(shapes)}))"
            )
        b = _Builder()
        depth = 0
        prev: torch.Tensor | None = None  # output nodes of the last layer
        slots_used = 0
        for index in order:
            shape = shapes[index]
            numel = shape.numel()
            if len(shape) >= 2 and numel > 0:
                out, inn = shape[0], shape[1]
                kernel = tuple(shape[2:])
                if prev is not None and inn == len(prev):
                    inputs = prev
                elif prev is not None and inn % len(prev) == 0:
                    inputs = prev.repeat_interleave(inn // len(prev))
                else:
                    inputs = b.add_nodes(inn, NODE_ROLES.index("input"), depth)
                depth += 1
                outputs = b.add_nodes(out, NODE_ROLES.index("hidden"), depth)
                b.edge_layers.append((inputs, outputs, kernel))
                b.edge_tensors.append(index)
                prev = outputs
                slots_used = 0
            elif len(shape) == 1 and prev is not None and shape[0] == len(prev):
                b.slot_tensors.append(index)
                b.slot_node.append(prev)
                stype = min(slots_used, NUM_LAYER_SLOT_TYPES - 1)
                b.slot_type.append(torch.full((numel,), stype, dtype=torch.long))
                slots_used += 1
            else:
                nodes = b.add_nodes(numel, NODE_ROLES.index("standalone"), depth)
                b.slot_tensors.append(index)
                b.slot_node.append(nodes)
                b.slot_type.append(torch.full((numel,), STANDALONE_SLOT))
        return cls._finish(b, shapes, prev, depth)

    @classmethod
    def from_parameters(cls, params: Iterable[torch.Tensor]) -> NeuralGraph:
        """Build the graph of an ordered parameter list (uses shapes only)."""
        return cls.from_shapes([p.shape for p in params])

    @classmethod
    def _finish(cls, b, shapes, last_layer, max_depth) -> NeuralGraph:
        def cat(parts, dtype=torch.long, width=None):
            if parts:
                return torch.cat(parts)
            return torch.zeros((0,) if width is None else (0, width), dtype=dtype)

        role = cat(b.node_role)
        if last_layer is not None:
            role[last_layer] = NODE_ROLES.index("output")
        depth = cat(b.node_depth).float() / max(max_depth, 1)
        node_attr = torch.cat(
            [
                torch.nn.functional.one_hot(role, len(NODE_ROLES)).float(),
                depth[:, None],
            ],
            dim=1,
        )
        order = tuple(b.edge_tensors + b.slot_tensors)
        numels = torch.tensor([shapes[i].numel() for i in order], dtype=torch.long)
        tensor_id = torch.repeat_interleave(
            torch.tensor(order, dtype=torch.int32), numels
        )
        edge_index, kernel_attr = _write_edges(b.edge_layers)
        return cls(
            shapes=shapes,
            num_nodes=b.num_nodes,
            tensor_order=order,
            edge_index=edge_index,
            kernel_attr=kernel_attr,
            slot_node=cat(b.slot_node).int(),
            slot_type=cat(b.slot_type),
            node_attr=node_attr,
            tensor_id=tensor_id,
        )

    # ------------------------------------------------------------ properties
    @property
    def num_edges(self) -> int:
        return self.edge_index.shape[1]

    @property
    def edge_attr(self) -> torch.Tensor:
        """Static edge attributes ``(EDGE_ATTR_DIM, E)`` (zeros for 1-tap edges)."""
        if self.kernel_attr is not None:
            return self.kernel_attr
        return torch.zeros(EDGE_ATTR_DIM, self.num_edges, device=self.edge_index.device)

    @property
    def num_slots(self) -> int:
        return self.slot_node.numel()

    @property
    def num_scalars(self) -> int:
        return self.tensor_id.numel()

    @property
    def numels(self) -> list[int]:
        """Sizes of the parameter tensors, in graph order."""
        return [self.shapes[i].numel() for i in self.tensor_order]

    # Derived from the graph alone, so computed once and kept (cached_property
    # writes the instance dict directly, which a frozen dataclass allows).
    @cached_property
    def segment_lengths(self) -> torch.Tensor:
        """:attr:`numels` as an int64 tensor on the graph's device (the
        ``lengths`` of per-tensor segment reductions over ``(..., P)``)."""
        return torch.tensor(self.numels, dtype=torch.long, device=self.tensor_id.device)

    @cached_property
    def tensor_position(self) -> torch.Tensor:
        """``(num tensors,)`` int64: position in graph order of each parameter
        tensor (the inverse of :attr:`tensor_order`), so that ``values[:,
        tensor_position][:, tensor_id]`` expands per-tensor values given in
        graph order to every scalar."""
        position = [0] * len(self.shapes)
        for pos, index in enumerate(self.tensor_order):
            position[index] = pos
        return torch.tensor(position, dtype=torch.long, device=self.tensor_id.device)

    @cached_property
    def degree(self) -> EdgeDegree:
        """Fan-in and fan-out of each node and whether edges are ordered by
        ``dst`` (:func:`edge_degree`), for mean aggregation."""
        return edge_degree(self.edge_index, self.num_nodes)

    @cached_property
    def log_degree(self) -> torch.Tensor:
        """``(N, 2)`` float: ``log(1 + fan-in)`` and ``log(1 + fan-out)`` of each
        node (from :attr:`degree`; a conv channel's fan-in counts every kernel
        tap), the node inputs of rules with ``degree_features``."""
        fan = torch.stack([self.degree.fan_in, self.degree.fan_out], dim=1)
        return fan.float().log1p()

    def to(self, device: torch.device | str) -> NeuralGraph:
        """A copy with every index tensor on ``device``."""
        moved = {
            name: getattr(self, name).to(device)
            for name in self.__dataclass_fields__
            if isinstance(getattr(self, name), torch.Tensor)
        }
        moved.setdefault("kernel_attr", None)
        return NeuralGraph(
            shapes=self.shapes,
            num_nodes=self.num_nodes,
            tensor_order=self.tensor_order,
            **moved,
        )

    # ------------------------------------------------------- flat <-> tensors
    def flatten(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """Concatenate tensors given in parameter order into one flat float32
        vector in graph order."""
        return torch.cat([tensors[i].reshape(-1) for i in self.tensor_order]).float()

    def unflatten(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Split the last dim of a graph-order ``(..., P)`` tensor into views of
        the parameter shapes, returned in parameter order."""
        lead = flat.shape[:-1]
        parts = flat.split(self.numels, dim=-1)
        out: list[torch.Tensor] = [flat] * len(self.shapes)
        for i, part in zip(self.tensor_order, parts):
            out[i] = part.view(lead + self.shapes[i])
        return out

    def per_scalar(self, values: Sequence, dtype: torch.dtype) -> torch.Tensor:
        """Expand one value per parameter tensor (parameter order) to ``(P,)``
        in graph order."""
        device = self.tensor_id.device
        return torch.tensor(list(values), dtype=dtype, device=device)[self.tensor_id]

    def split_scalars(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Split the last dim of ``(..., P)`` into edges ``(..., E)`` and slots
        ``(..., S)`` (views)."""
        return values[..., : self.num_edges], values[..., self.num_edges :]

    def __repr__(self) -> str:
        return (
            f"NeuralGraph(tensors={len(self.shapes)}, nodes={self.num_nodes}, "
            f"edges={self.num_edges}, slots={self.num_slots})"
        )
