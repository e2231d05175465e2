"""NG-GNN: the optimizer's graph backbone with weight-space readouts.

The backbone (:class:`lopt.nn.GraphBackbone`, a stack of
:class:`lopt.nn.NGConv`) is used unchanged; this module only adapts
PyG-style data to it (edge features are node-major ``(E, F)`` here and
channel-major ``(F, E)`` there) and adds readouts: a graph-level one (mean
pooling over each graph's nodes and edges, invariant to permutations of hidden
neurons) and per-node and per-edge ones (equivariant), shaped like ``x`` and
``edge_attr`` so that :func:`~lopt.weightspace.from_graph_outputs` maps them
back to a delta per weight, bias and norm parameter.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from lopt.nn import GraphBackbone
from lopt.weightspace.data import (
    ACTIVATIONS,
    LAYER_TYPES,
    NODE_FEATURES,
    NODE_ROLES,
)

__all__ = ["NeuralGraphGNN", "WeightSpaceOutput", "node_inputs", "edge_inputs"]

#: Width of :func:`node_inputs`.
NODE_INPUTS = len(NODE_FEATURES) + len(NODE_ROLES) + len(LAYER_TYPES) + len(ACTIVATIONS)


def node_inputs(data) -> torch.Tensor:
    """``(N, NODE_INPUTS)``: node features, role, layer type and activation
    (one-hot). Nothing tells hidden neurons apart but their values and
    connections; positional embeddings of input and output neurons come
    later (issue 10, part 3)."""
    return torch.cat(
        [
            data.x,
            F.one_hot(data.node_role, len(NODE_ROLES)).to(data.x.dtype),
            F.one_hot(data.node_type, len(LAYER_TYPES)).to(data.x.dtype),
            F.one_hot(data.node_act, len(ACTIVATIONS)).to(data.x.dtype),
        ],
        dim=1,
    )


def edge_inputs(data) -> torch.Tensor:
    """``(E, F_edge + len(LAYER_TYPES))``: edge features and layer type."""
    kind = F.one_hot(data.edge_type, len(LAYER_TYPES)).to(data.edge_attr.dtype)
    return torch.cat([data.edge_attr, kind], dim=1)


def _mean_pool(values: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    total = values.new_zeros(size, values.shape[1]).index_add_(0, index, values)
    count = torch.bincount(index, minlength=size).clamp(min=1)
    return total / count[:, None].to(values.dtype)


class WeightSpaceOutput(NamedTuple):
    graph: torch.Tensor  # (B, graph_out): one row per graph
    node: torch.Tensor  # (N, len(NODE_FEATURES)): shaped like data.x
    edge: torch.Tensor  # (E, F_edge): shaped like data.edge_attr


class NeuralGraphGNN(nn.Module):
    r"""NG-GNN (Kofinas et al. 2024) on :class:`lopt.nn.GraphBackbone`.

    Args:
        edge_features (int): ``F_edge`` of the graphs (``prod(kernel_shape)``).
        graph_out (int, optional): width of the graph-level output.
            (default: ``1``)
        node_dim (int, optional): node embedding width. (default: ``32``)
        edge_dim (int, optional): edge embedding width. (default: ``8``)
        num_layers (int, optional): message-passing layers. (default: ``2``)

    Shapes:
        - **input:** a :class:`~lopt.weightspace.NeuralGraphData` or a batch
          of them (``x (N, F_node)``, ``edge_index (2, E)``,
          ``edge_attr (E, F_edge)``, ``batch (N,)``)
        - **output:** :class:`WeightSpaceOutput`: graph ``(B, graph_out)``,
          node ``(N, F_node)``, edge ``(E, F_edge)``
    """

    def __init__(
        self,
        edge_features: int,
        graph_out: int = 1,
        node_dim: int = 32,
        edge_dim: int = 8,
        num_layers: int = 2,
    ):
        super().__init__()
        if edge_features < 1:
            raise ValueError(f"Invalid edge_features: {edge_features}")
        self.edge_features, self.graph_out = edge_features, graph_out
        self.backbone = GraphBackbone(
            NODE_INPUTS,
            edge_features + len(LAYER_TYPES),
            node_dim=node_dim,
            edge_dim=edge_dim,
            num_layers=num_layers,
        )
        self.graph_head = nn.Sequential(
            nn.Linear(node_dim + edge_dim, node_dim),
            nn.SiLU(),
            nn.Linear(node_dim, graph_out),
        )
        self.node_head = nn.Linear(node_dim, len(NODE_FEATURES))
        self.edge_head = nn.Linear(edge_dim, edge_features)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.backbone.reset_parameters()
        for layer in (*self.graph_head, self.node_head, self.edge_head):
            if isinstance(layer, nn.Linear):
                layer.reset_parameters()

    def forward(self, data) -> WeightSpaceOutput:
        if data.edge_attr.shape[1] != self.edge_features:
            raise ValueError(
                f"graphs have {data.edge_attr.shape[1]} edge features, the model "
                f"expects {self.edge_features} (pass the same kernel_size to "
                "to_graph for every network)"
            )
        edge_index = data.edge_index
        h, e = self.backbone(
            node_inputs(data), edge_index, edge_inputs(data).T.contiguous()
        )
        e = e.T
        batch = getattr(data, "batch", None)
        if batch is None:
            batch = edge_index.new_zeros(h.shape[0])
        num_graphs = int(getattr(data, "num_graphs", 1))
        pooled = torch.cat(
            [
                _mean_pool(h, batch, num_graphs),
                _mean_pool(e, batch[edge_index[0]], num_graphs),
            ],
            dim=1,
        )
        return WeightSpaceOutput(
            self.graph_head(pooled), self.node_head(h), self.edge_head(e)
        )

    def __repr__(self) -> str:
        b = self.backbone
        return (
            f"{self.__class__.__name__}(edge_features={self.edge_features}, "
            f"graph_out={self.graph_out}, node_dim={b.node_dim}, "
            f"edge_dim={b.edge_dim}, num_layers={b.num_layers})"
        )
