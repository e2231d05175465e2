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

:meth:`NeuralGraph.from_module` builds the same kind of graph from the module's
``torch.fx`` trace instead (:mod:`lopt.tracing`): a residual sum merges the
neurons it adds, norms attach to the neurons they normalise, whatever the
order of the parameters.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import NamedTuple

import torch
from torch import fx, nn

from lopt.tracing import FxWalker, TracedValue, Unsupported, trace_module

__all__ = [
    "NeuralGraph",
    "Unsupported",
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
    def from_module(
        cls, model: nn.Module, params: Sequence[torch.Tensor]
    ) -> NeuralGraph:
        """Build the graph of ``params`` from ``model``'s ``torch.fx`` trace.

        The structure is the module's, read from its trace (:mod:`lopt.tracing`)
        rather than inferred from the order of the parameters:

        * a linear or conv layer's weight is edges from the neurons it reads
          (the channels of a flattened map: input feature ``i`` of a linear
          layer after a flatten of ``C`` channels comes from channel
          ``i // (in / C)``, as in :meth:`from_shapes`) to new neurons; its
          bias is a slot of them;
        * a norm's scale and shift are slots of the neurons it normalises;
        * a residual sum ``x + f(x)`` merges ``f``'s output neurons with
          ``x``'s (edges come from parameters only), so a block's weights may
          form cycles and, for a one-layer block, self-loops;
        * the ``k``-th vector placed on a group of neurons gets slot type
          ``k`` (capped), as the ``k``-th vector after a layer does in
          :meth:`from_shapes`: a bias is type 0, a norm's scale and shift
          after it types 1 and 2 (neurons merged by a residual sum count the
          most vectors either had);
        * parameters the trace does not place become standalone nodes.

        Neurons are numbered in trace order, skipping those that hold none of
        ``params`` (a frozen layer's), so the graph depends neither on the
        order of ``params`` nor on the values of the weights; for a chain of
        layers it equals :meth:`from_shapes` in the model's order.

        Args:
            model: the network; every tensor of ``params`` must be one of its
                parameters.
            params: the parameters the graph covers; tensor ``i`` of the
                graph is ``params[i]``.

        Raises:
            Unsupported: the trace fails or holds something this graph cannot
                represent exactly (attention, recurrent layers, shared
                weights, ...): fall back to :meth:`from_shapes`.
            ValueError: a tensor of ``params`` is not a parameter of ``model``.
        """
        named = list(model.named_parameters(remove_duplicate=False))
        position = {id(p): i for i, p in enumerate(params)}
        known = {id(p) for _, p in named}
        for p in params:
            if id(p) not in known:
                raise ValueError(
                    f"Invalid parameter of shape {tuple(p.shape)}: not a "
                    f"parameter of {type(model).__name__}"
                )
        walker = _TracedGraph(trace_module(model), named, position)
        outputs = walker.run()
        return walker.build(cls, [p.shape for p in params], outputs)

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


class _TracedGraph(FxWalker):
    """Walks a trace into the edges and slots of :meth:`NeuralGraph.from_module`.

    Neurons merged by a residual sum are kept in a union-find forest (the
    smaller id is the root); edges and slots keep the ids they were made with
    and are mapped to their roots in :meth:`build`.
    """

    def __init__(
        self,
        gm: fx.GraphModule,
        named: list[tuple[str, torch.Tensor]],
        position: dict[int, int],
    ):
        super().__init__(gm, {name: p.shape for name, p in named})
        self.ident = {name: id(p) for name, p in named}
        self.position = position  # id of an optimized parameter -> its index
        self.placed: set[int] = set()  # ids of the parameters met
        self.role: list[int] = []
        self.depth: list[int] = []  # at a root: the deepest of its neurons
        self.parent: list[int] = []
        self.slots_used: list[int] = []  # at a root: vectors placed on it
        #: (parameter index, input ids, output ids, kernel) per edge tensor.
        self.edges: list[tuple[int, torch.Tensor, torch.Tensor, tuple]] = []
        #: (parameter index, node ids, slot type) per slot tensor.
        self.slots: list[tuple[int, torch.Tensor, int]] = []

    def _new(self, count: int, role: str, depth: int) -> torch.Tensor:
        start = len(self.role)
        self.role += [NODE_ROLES.index(role)] * count
        self.depth += [depth] * count
        self.parent += range(start, start + count)
        self.slots_used += [0] * count
        return torch.arange(start, start + count)

    def _find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def _roots(self, nodes: torch.Tensor) -> list[int]:
        return [self._find(i) for i in nodes.tolist()]

    def _param(self, name: str) -> int | None:
        """Mark parameter ``name`` as placed; its index in ``params`` (None:
        not optimized)."""
        ident = self.ident[name]
        if ident in self.placed:
            raise Unsupported(f"{name} is used twice (shared weights)")
        self.placed.add(ident)
        return self.position.get(ident)

    def _slot(self, name: str, nodes: torch.Tensor) -> None:
        if tuple(self.shapes[name]) != (len(nodes),):
            raise Unsupported(
                f"{name} of shape {tuple(self.shapes[name])} does not fit "
                f"{len(nodes)} neurons"
            )
        index = self._param(name)
        roots = self._roots(nodes)
        used = max((self.slots_used[r] for r in roots), default=0)
        for r in roots:
            self.slots_used[r] = used + 1
        if index is not None:
            stype = min(used, NUM_LAYER_SLOT_TYPES - 1)
            self.slots.append((index, nodes, stype))

    def new_inputs(self, count: int) -> torch.Tensor:
        return self._new(count, "input", 0)

    def layer(self, name, inputs, out, kernel, layer_type) -> torch.Tensor:
        weight = f"{name}.weight"
        if weight not in self.shapes:
            raise Unsupported(f"{name} has no weight parameter")
        depth = max((self.depth[r] for r in self._roots(inputs)), default=0)
        outputs = self._new(out, "hidden", depth + 1)
        if layer_type == "flatten_linear":
            # One edge per input feature, from the channel it belongs to.
            inputs = inputs.repeat_interleave(math.prod(kernel))
            kernel = ()
        index = self._param(weight)
        if index is not None:
            self.edges.append((index, inputs, outputs, tuple(kernel)))
        if f"{name}.bias" in self.shapes:
            self._slot(f"{name}.bias", outputs)
        return outputs

    def norm(self, name: str, inputs: torch.Tensor) -> torch.Tensor:
        for leaf in ("weight", "bias"):
            if f"{name}.{leaf}" in self.shapes:
                self._slot(f"{name}.{leaf}", inputs)
        return inputs

    def residual(self, operands, nodes) -> TracedValue:
        for i, j in zip(self._roots(nodes[0]), self._roots(nodes[1])):
            if i == j:
                continue
            root, other = min(i, j), max(i, j)
            self.parent[other] = root
            self.depth[root] = max(self.depth[root], self.depth[other])
            self.slots_used[root] = max(self.slots_used[root], self.slots_used[other])
        a, b = (self.env[o] for o in operands)
        return replace(a, nodes=nodes[0], conv_dims=max(a.conv_dims, b.conv_dims))

    def build(
        self,
        cls: type[NeuralGraph],
        shapes: Sequence[torch.Size],
        outputs: torch.Tensor | None,
    ) -> NeuralGraph:
        """The graph of the walk, over parameters of ``shapes``."""
        shapes = tuple(torch.Size(s) for s in shapes)
        root = torch.tensor(
            [self._find(i) for i in range(len(self.parent))], dtype=torch.long
        )
        kept = torch.zeros(len(root), dtype=torch.bool)
        for _, inputs, outs, _ in self.edges:
            kept[root[inputs]] = True
            kept[root[outs]] = True
        for _, nodes, _ in self.slots:
            kept[root[nodes]] = True
        renumber = (kept.long().cumsum(0) - 1)[root]
        keep = kept.nonzero().reshape(-1)
        b = _Builder(num_nodes=len(keep))
        depth = torch.tensor(self.depth, dtype=torch.long)[keep]
        b.node_role.append(torch.tensor(self.role, dtype=torch.long)[keep])
        b.node_depth.append(depth)
        for index, inputs, outs, kernel in self.edges:
            b.edge_layers.append((renumber[inputs], renumber[outs], kernel))
            b.edge_tensors.append(index)
        for index, nodes, stype in self.slots:
            b.slot_tensors.append(index)
            b.slot_node.append(renumber[nodes])
            b.slot_type.append(torch.full((len(nodes),), stype, dtype=torch.long))
        placed = set(b.edge_tensors) | set(b.slot_tensors)
        for index, shape in enumerate(shapes):
            if index not in placed:
                nodes = b.add_nodes(shape.numel(), NODE_ROLES.index("standalone"), 0)
                b.slot_tensors.append(index)
                b.slot_node.append(nodes)
                b.slot_type.append(torch.full((shape.numel(),), STANDALONE_SLOT))
        last = None
        if outputs is not None:
            ids = root[outputs]
            last = renumber[ids[kept[ids]]]
        max_depth = int(depth.max()) if len(depth) else 0
        return cls._finish(b, shapes, last, max_depth)
