"""Task-agnostic graph network over neural graphs."""

from __future__ import annotations

import torch
from torch import nn

from lopt.graph import EdgeDegree
from lopt.nn.conv import NGConv, channel_linear

__all__ = ["GraphBackbone"]


class GraphBackbone(nn.Module):
    r"""Encoders followed by a stack of :class:`NGConv` layers.

    Maps a graph with node inputs and edge inputs to node and edge embeddings.
    It knows nothing about optimizers: the learned optimizer and the
    weight-space tasks both use it unchanged.

    Args:
        node_in (int): width of node inputs.
        edge_in (int): width of edge inputs.
        node_dim (int, optional): width of node embeddings. (default: ``32``)
        edge_dim (int, optional): width of edge embeddings. (default: ``8``)
        num_layers (int, optional): number of message-passing layers.
            (default: ``2``)
        edge_mlp (bool, optional): edge updates through a per-edge MLP (see
            :class:`NGConv`). (default: ``True``)

    Shapes:
        - **input:** node inputs :math:`(|V|, F_{v,in})`, edge indices
          :math:`(2, |E|)`, edge inputs :math:`(F_{e,in}, |E|)` (channel-major,
          see :class:`NGConv`)
        - **output:** node embeddings :math:`(|V|, F_v)`, edge embeddings
          :math:`(F_e, |E|)`
    """

    def __init__(
        self,
        node_in: int,
        edge_in: int,
        node_dim: int = 32,
        edge_dim: int = 8,
        num_layers: int = 2,
        edge_mlp: bool = True,
    ):
        super().__init__()
        self.node_in, self.edge_in = node_in, edge_in
        self.node_dim, self.edge_dim, self.num_layers = node_dim, edge_dim, num_layers
        self.node_encoder = nn.Sequential(
            nn.Linear(node_in, node_dim), nn.SiLU(), nn.Linear(node_dim, node_dim)
        )
        # Edges are as many as weights: their encoder is one linear map.
        self.edge_encoder = nn.Linear(edge_in, edge_dim)
        self.layers = nn.ModuleList(
            NGConv(node_dim, edge_dim, edge_mlp=edge_mlp) for _ in range(num_layers)
        )

    def reset_parameters(self) -> None:
        for layer in self.node_encoder:
            if isinstance(layer, nn.Linear):
                layer.reset_parameters()
        self.edge_encoder.reset_parameters()
        for layer in self.layers:
            layer.reset_parameters()

    def forward(
        self,
        x: torch.Tensor,
        edge_index: torch.Tensor,
        edge_attr: torch.Tensor | tuple[torch.Tensor, ...],
        degree: EdgeDegree | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``edge_attr`` may be a tuple of channel-major blocks whose rows
        together make the first inputs of ``F_{e,in}``: they are encoded block
        by block, which avoids materialising their concatenation over all
        edges; trailing inputs left out are taken as zeros. ``degree``: the
        graph's :func:`~lopt.graph.edge_degree`, if the caller keeps it."""
        h = self.node_encoder(x)
        if isinstance(edge_attr, torch.Tensor):
            e = channel_linear(self.edge_encoder, edge_attr)
        else:
            rows = [len(b) for b in edge_attr]
            weights = self.edge_encoder.weight[:, : sum(rows)].split(rows, dim=1)
            e = self.edge_encoder.bias[:, None]
            for weight, block in zip(weights, edge_attr):
                e = torch.addmm(e, weight, block)
        for layer in self.layers:
            h, e = layer(h, edge_index, e, degree)
        return h, e

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}(node_in={self.node_in}, "
            f"edge_in={self.edge_in}, "
            f"node_dim={self.node_dim}, edge_dim={self.edge_dim}, "
            f"num_layers={self.num_layers})"
        )
