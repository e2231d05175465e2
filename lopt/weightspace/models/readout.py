"""Readouts shared by the weight-space models: graph-level (invariant),
per-node and per-edge (equivariant, shaped like the graph's features)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from lopt.nn.conv import mean_std_from_sums
from lopt.weightspace.graph.data import NODE_FEATURES, NODE_ROLES

__all__ = [
    "POOLINGS",
    "WeightSpaceOutput",
    "WeightSpaceReadout",
    "depth_pool",
    "mean_pool",
    "output_neurons",
    "pool",
]

#: Graph-level readouts a model may combine. ``"mean"``, ``"std"`` and
#: ``"max"`` aggregate all node and all edge embeddings; each is symmetric in
#: the rows it pools. ``"output"`` concatenates the embeddings of the output
#: neurons in the order of their positions (the paper's readout, "cat" over
#: the last layer): output neurons are never permuted, so it is invariant too.
#: ``"depth"`` concatenates the means over :data:`DEPTH_BINS` + 1 bins of
#: relative depth (see :func:`depth_pool`): per-layer summaries, as StatNN's
#: per-layer blocks, for networks of any depth.
POOLINGS = ("mean", "std", "max", "output", "depth")
#: Bins of ``"depth"`` pooling after the input layer's own bin.
DEPTH_BINS = 4

_OUTPUT = NODE_ROLES.index("output")


class WeightSpaceOutput(NamedTuple):
    graph: torch.Tensor  # (B, graph_out): one row per graph
    node: torch.Tensor  # (N, len(NODE_FEATURES)): shaped like data.x
    edge: torch.Tensor  # (E, F_edge): shaped like data.edge_attr


def mean_pool(values: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    """``(size, F)``: the mean of the rows of ``values (n, F)`` per group
    ``index (n,)`` (zero for an empty group)."""
    total = values.new_zeros(size, values.shape[1]).index_add_(0, index, values)
    count = torch.bincount(index, minlength=size).clamp(min=1)
    return total / count[:, None].to(values.dtype)


def pool(
    values: torch.Tensor, index: torch.Tensor, size: int, how: str
) -> torch.Tensor:
    """``(size, F)``: one of :data:`POOLINGS` of the rows of ``values (n, F)``
    per group ``index (n,)``; an empty group gives zeros."""
    if how == "mean":
        return mean_pool(values, index, size)
    if how == "std":
        # The backbone's aggregation: mean and std from sums of values and squares.
        width = values.shape[1]
        sums = values.new_zeros(size, 2 * width).index_add_(
            0, index, torch.cat([values, values * values], dim=1)
        )
        count = torch.bincount(index, minlength=size).to(values.dtype)
        return mean_std_from_sums(sums.T, count, width)[1]
    if how == "output":
        raise ValueError("'output' reads output neurons: see output_neurons()")
    if how == "depth":
        raise ValueError("'depth' needs the depths: see depth_pool()")
    if how == "max":
        out = values.new_full((size, values.shape[1]), -torch.inf)
        out = out.scatter_reduce(
            0, index[:, None].expand_as(values), values, "amax", include_self=True
        )
        return torch.where(torch.isinf(out), torch.zeros_like(out), out)
    raise ValueError(f"Invalid pooling: {how!r} (expected one of {POOLINGS})")


def depth_pool(
    values: torch.Tensor,
    depth: torch.Tensor,
    index: torch.Tensor,
    deepest: torch.Tensor,
    size: int,
    bins: int = DEPTH_BINS,
) -> torch.Tensor:
    """``(size, (bins + 1) F)``: per group (graph), the means of the rows of
    ``values (n, F)`` in each of ``bins + 1`` bins of relative depth,
    concatenated: bin 0 holds depth 0 (input neurons), bin ``k >= 1`` the
    depths ``d`` with ``ceil(bins d / D) = k`` where ``D = deepest[group]``
    (so a network of ``bins`` layers gets one bin per layer). Empty bins give
    zeros. ``depth (n,)`` and ``index (n,)``: each row's depth and group."""
    total = deepest[index].clamp(min=1).to(values.dtype)
    level = torch.ceil(bins * depth.to(values.dtype) / total).long().clamp(0, bins)
    pooled = mean_pool(values, index * (bins + 1) + level, size * (bins + 1))
    return pooled.view(size, (bins + 1) * values.shape[1])


def output_neurons(
    h: torch.Tensor, data, batch: torch.Tensor, num_graphs: int, count: int
) -> torch.Tensor:
    """``(num_graphs, count * F)``: the embeddings ``h (N, F)`` of each graph's
    output neurons at positions ``0 .. count - 1``, concatenated in position
    order; positions a graph lacks are zeros.

    Raises:
        ValueError: a graph has an output neuron at a position ``>= count``.
    """
    out = data.node_role == _OUTPUT
    pos = data.node_pos[out]
    if len(pos) and int(pos.max()) >= count:
        raise ValueError(
            f"a graph has an output neuron at position {int(pos.max())}; the "
            f"readout reads {count} output neurons (raise output_neurons)"
        )
    rows = batch[out] * count + pos
    table = h.new_zeros(num_graphs * count, h.shape[1]).index_add_(0, rows, h[out])
    return table.view(num_graphs, count * h.shape[1])


def graph_batch(data, num_nodes: int) -> tuple[torch.Tensor, int]:
    """``data.batch`` and the number of graphs; a single graph is graph 0."""
    batch = getattr(data, "batch", None)
    if batch is None:
        return torch.zeros(num_nodes, dtype=torch.long, device=data.x.device), 1
    return batch, int(data.num_graphs)


def deepest_layer(data, batch: torch.Tensor, num_graphs: int) -> torch.Tensor:
    """``(num_graphs,)``: the largest ``node_layer`` of each graph."""
    depth = data.node_layer
    return depth.new_zeros(num_graphs).scatter_reduce(
        0, batch, depth, "amax", include_self=True
    )


class WeightSpaceReadout(nn.Module):
    r"""Graph, node and edge outputs from node and edge embeddings.

    The graph output is an MLP of pooled node and edge embeddings of each
    graph, :math:`\mathrm{MLP}([\mathrm{pool}(h), \mathrm{pool}(e)])`, where
    ``pooling`` names the aggregations concatenated (mean alone, or with the
    standard deviation and maximum, as in PNA): each is symmetric, so the
    output is invariant to any relabelling of the nodes. ``"output"`` adds
    the embeddings of the first ``output_neurons`` output neurons, in
    position order (see :func:`output_neurons`), the readout of the paper's
    code: invariant to permutations of hidden neurons, which is the symmetry
    of a network. ``"depth"`` adds the mean node and edge embeddings per bin
    of relative depth (:func:`depth_pool`; an edge goes with the neuron it
    feeds), invariant for the same reason. Node and
    edge outputs are linear maps of each embedding, so they permute with the
    nodes and edges, and have the widths of ``x`` and ``edge_attr`` so that
    :func:`~lopt.weightspace.from_graph_outputs` maps them back to a
    state_dict.

    Args:
        node_dim (int): width of node embeddings.
        edge_dim (int): width of edge embeddings.
        edge_features (int): ``F_edge`` of the graphs.
        graph_out (int): width of the graph-level output.
        pooling (sequence of str, optional): aggregations from
            :data:`POOLINGS`. (default: ``("mean",)``)
        output_neurons (int, optional): with ``"output"`` pooling, how many
            output neurons it reads (the widest output layer of the data).
            (default: ``1``)

    Shapes:
        - **input:** node embeddings ``(N, node_dim)``, edge embeddings
          ``(E, edge_dim)`` (node-major), ``edge_index (2, E)``, the graph
          (or batch) they came from
        - **output:** :class:`WeightSpaceOutput`
    """

    def __init__(
        self,
        node_dim: int,
        edge_dim: int,
        edge_features: int,
        graph_out: int,
        pooling: Sequence[str] = ("mean",),
        output_neurons: int = 1,
    ):
        super().__init__()
        if graph_out < 1:
            raise ValueError(f"Invalid graph_out: {graph_out}")
        if output_neurons < 1:
            raise ValueError(f"Invalid output_neurons: {output_neurons}")
        pooling = tuple(pooling)
        bad = [p for p in pooling if p not in POOLINGS]
        if not pooling or bad or len(set(pooling)) != len(pooling):
            raise ValueError(
                f"Invalid pooling: {list(pooling)} (distinct names from {POOLINGS})"
            )
        self.pooling, self.output_neurons = pooling, output_neurons
        symmetric = [p for p in pooling if p not in ("output", "depth")]
        width = len(symmetric) * (node_dim + edge_dim)
        if "output" in pooling:
            width += output_neurons * node_dim
        if "depth" in pooling:
            width += (DEPTH_BINS + 1) * (node_dim + edge_dim)
        self.graph_head = nn.Sequential(
            nn.Linear(width, node_dim),
            nn.SiLU(),
            nn.Linear(node_dim, graph_out),
        )
        self.node_head = nn.Linear(node_dim, len(NODE_FEATURES))
        self.edge_head = nn.Linear(edge_dim, edge_features)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for layer in (*self.graph_head, self.node_head, self.edge_head):
            if isinstance(layer, nn.Linear):
                layer.reset_parameters()

    def forward(
        self, h: torch.Tensor, e: torch.Tensor, edge_index: torch.Tensor, data
    ) -> WeightSpaceOutput:
        batch, num_graphs = graph_batch(data, h.shape[0])
        edge_batch = batch[edge_index[0]]
        symmetric = [p for p in self.pooling if p not in ("output", "depth")]
        parts = [pool(h, batch, num_graphs, how) for how in symmetric]
        parts += [pool(e, edge_batch, num_graphs, how) for how in symmetric]
        if "output" in self.pooling:
            parts.append(
                output_neurons(h, data, batch, num_graphs, self.output_neurons)
            )
        if "depth" in self.pooling:
            depth = data.node_layer
            deepest = deepest_layer(data, batch, num_graphs)
            # An edge is binned with the neuron it feeds.
            dst = edge_index[1]
            parts.append(depth_pool(h, depth, batch, deepest, num_graphs))
            parts.append(depth_pool(e, depth[dst], edge_batch, deepest, num_graphs))
        pooled = torch.cat(parts, dim=1)
        return WeightSpaceOutput(
            self.graph_head(pooled), self.node_head(h), self.edge_head(e)
        )
