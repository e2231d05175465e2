"""Readouts shared by the weight-space models: graph-level (invariant),
per-node and per-edge (equivariant, shaped like the graph's features)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from lopt.nn.conv import mean_std_from_sums
from lopt.weightspace.data import NODE_FEATURES

__all__ = ["POOLINGS", "WeightSpaceOutput", "WeightSpaceReadout", "mean_pool", "pool"]

#: Graph-level aggregations a readout may combine; each is symmetric in the
#: rows it pools, so the graph output stays invariant to relabelling nodes.
POOLINGS = ("mean", "std", "max")


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
    if how == "max":
        out = values.new_full((size, values.shape[1]), -torch.inf)
        out = out.scatter_reduce(
            0, index[:, None].expand_as(values), values, "amax", include_self=True
        )
        return torch.where(torch.isinf(out), torch.zeros_like(out), out)
    raise ValueError(f"Invalid pooling: {how!r} (expected one of {POOLINGS})")


def graph_batch(data, num_nodes: int) -> tuple[torch.Tensor, int]:
    """``data.batch`` and the number of graphs; a single graph is graph 0."""
    batch = getattr(data, "batch", None)
    if batch is None:
        return torch.zeros(num_nodes, dtype=torch.long, device=data.x.device), 1
    return batch, int(data.num_graphs)


class WeightSpaceReadout(nn.Module):
    r"""Graph, node and edge outputs from node and edge embeddings.

    The graph output is an MLP of pooled node and edge embeddings of each
    graph, :math:`\mathrm{MLP}([\mathrm{pool}(h), \mathrm{pool}(e)])`, where
    ``pooling`` names the aggregations concatenated (mean alone, or with the
    standard deviation and maximum, as in PNA): each is symmetric, so the
    output is invariant to any relabelling of the nodes. Node and
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
    ):
        super().__init__()
        if graph_out < 1:
            raise ValueError(f"Invalid graph_out: {graph_out}")
        pooling = tuple(pooling)
        bad = [p for p in pooling if p not in POOLINGS]
        if not pooling or bad or len(set(pooling)) != len(pooling):
            raise ValueError(
                f"Invalid pooling: {list(pooling)} (distinct names from {POOLINGS})"
            )
        self.pooling = pooling
        width = len(pooling) * (node_dim + edge_dim)
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
        pooled = torch.cat(
            [pool(h, batch, num_graphs, how) for how in self.pooling]
            + [pool(e, edge_batch, num_graphs, how) for how in self.pooling],
            dim=1,
        )
        return WeightSpaceOutput(
            self.graph_head(pooled), self.node_head(h), self.edge_head(e)
        )
