"""NG-T: a relational transformer over neural graphs (Kofinas et al. 2024).

Every neuron attends to every neuron of its own network; where two neurons are
joined by a weight, that weight's edge embedding enters the attention between
them (relational attention, after Diao & Loynd 2023). Edges are then updated
from their endpoints, as in :class:`lopt.nn.NGConv`. Nothing is positional
but what the input features give (input and output neurons' positions), so
the model is equivariant to permutations of hidden neurons by construction.

Graphs of a batch are padded to the largest (``to_dense_batch``) and padding
is masked out of the keys, so no neuron attends across networks. The cost is
quadratic in the neurons of the largest graph: meant for zoo networks of up to
a few hundred neurons.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch_geometric.utils import to_dense_batch

from lopt.weightspace.models.base import WeightSpaceModel
from lopt.weightspace.models.features import WeightSpaceConfig
from lopt.weightspace.models.readout import graph_batch

__all__ = ["RelationalAttentionLayer", "NeuralGraphTransformer"]


def local_ids(batch: torch.Tensor, num_graphs: int) -> torch.Tensor:
    """Each node's index within its own graph."""
    count = torch.bincount(batch, minlength=num_graphs)
    start = torch.cumsum(count, 0) - count
    return torch.arange(len(batch), device=batch.device) - start[batch]


class RelationalAttentionLayer(nn.Module):
    r"""One NG-T layer: relational self-attention, a node MLP, an edge update.

    For query neuron :math:`j`, key neuron :math:`i` of the same graph and
    their pair features :math:`r_{ji}` (the embeddings of edges
    :math:`i \to j` and :math:`j \to i` with an indicator of each, zero where
    absent; parallel edges summed), per head:

    .. math::
        \alpha_{ji} = \mathrm{softmax}_i\!\left(
            \frac{q_j^\top (k_i + K_r r_{ji})}{\sqrt{d_h}}\right),\qquad
        h_j \leftarrow h_j + W_o \sum_i \alpha_{ji} (v_i + V_r r_{ji})

    then :math:`h \leftarrow h + \mathrm{MLP}(\mathrm{LN}(h))` and, for each
    edge :math:`i \to j`,
    :math:`e_{ij} \leftarrow e_{ij} + W_2\,\sigma(W_e \mathrm{LN}(e_{ij}) +
    W_s h_i + W_t h_j)`. Queries, keys and values read
    :math:`\mathrm{LN}(h)` (pre-norm).

    :math:`K_r r_{ji}` and :math:`V_r r_{ji}` are linear in the pair
    features, so they are computed per edge and added where an edge is: the
    cost is :math:`O(M^2 d + |E| d)` per graph of :math:`M` neurons rather
    than :math:`O(M^2 d)` with a dense :math:`(M, M, d)` pair tensor (about
    10x the work and memory on cnn_wild's networks).

    Args:
        node_dim (int): width of node embeddings (a multiple of
            ``num_heads``).
        edge_dim (int): width of edge embeddings.
        num_heads (int, optional): attention heads. (default: ``4``)

    Shapes:
        - **input:** node embeddings ``(N, node_dim)``, edge embeddings
          ``(E, edge_dim)``, ``edge_index (2, E)``, ``batch (N,)``, number of
          graphs
        - **output:** node embeddings ``(N, node_dim)``, edge embeddings
          ``(E, edge_dim)``
    """

    def __init__(self, node_dim: int, edge_dim: int, num_heads: int = 4):
        super().__init__()
        if num_heads < 1 or node_dim % num_heads:
            raise ValueError(
                f"Invalid num_heads: {num_heads} (must divide node_dim={node_dim})"
            )
        self.node_dim, self.edge_dim, self.num_heads = node_dim, edge_dim, num_heads
        pair = 2 * edge_dim + 2
        self.node_norm = nn.LayerNorm(node_dim)
        self.qkv = nn.Linear(node_dim, 3 * node_dim)
        self.pair_key = nn.Linear(pair, node_dim, bias=False)
        self.pair_value = nn.Linear(pair, node_dim, bias=False)
        self.out = nn.Linear(node_dim, node_dim)
        self.mlp_norm = nn.LayerNorm(node_dim)
        self.mlp = nn.Sequential(
            nn.Linear(node_dim, 2 * node_dim),
            nn.SiLU(),
            nn.Linear(2 * node_dim, node_dim),
        )
        self.edge_norm = nn.LayerNorm(edge_dim)
        self.edge_self = nn.Linear(edge_dim, edge_dim)
        self.edge_src = nn.Linear(node_dim, edge_dim, bias=False)
        self.edge_dst = nn.Linear(node_dim, edge_dim, bias=False)
        self.edge_out = nn.Linear(edge_dim, edge_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for module in self.modules():
            if module is not self and hasattr(module, "reset_parameters"):
                module.reset_parameters()

    def forward(
        self,
        h: torch.Tensor,
        e: torch.Tensor,
        edge_index: torch.Tensor,
        batch: torch.Tensor,
        num_graphs: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        heads, width = self.num_heads, self.node_dim // self.num_heads
        dense, mask = to_dense_batch(self.node_norm(h), batch, batch_size=num_graphs)
        size = dense.shape[1]
        q, k, v = (
            t.reshape(num_graphs, size, heads, width)
            for t in self.qkv(dense).chunk(3, dim=-1)
        )
        # Pair terms per edge i -> j: as j's fan-in (query j, key i) and as
        # i's fan-out (query i, key j); pair_key/pair_value act on
        # [e_in, e_out, is_in, is_out], here split into its blocks.
        src, dst = edge_index
        local = local_ids(batch, num_graphs)
        g, ls, ld = batch[src], local[src], local[dst]
        d = self.edge_dim
        terms = []
        for lin in (self.pair_key, self.pair_value):
            w = lin.weight
            fan_in = F.linear(e, w[:, :d]) + w[:, 2 * d]
            fan_out = F.linear(e, w[:, d : 2 * d]) + w[:, 2 * d + 1]
            terms.append(
                (fan_in.view(-1, heads, width), fan_out.view(-1, heads, width))
            )
        (k_in, k_out), (v_in, v_out) = terms
        # logits (B, Mq, Mk, H)
        logits = torch.einsum("bjhd,bihd->bjih", q, k)
        logits = logits.index_put(
            (g, ld, ls), (q[g, ld] * k_in).sum(-1), accumulate=True
        )
        logits = logits.index_put(
            (g, ls, ld), (q[g, ls] * k_out).sum(-1), accumulate=True
        )
        logits = logits / math.sqrt(width)
        logits = logits.masked_fill(~mask[:, None, :, None], float("-inf"))
        attn = logits.softmax(dim=2)
        mixed = torch.einsum("bjih,bihd->bjhd", attn, v)
        mixed = mixed.index_put(
            (g, ld), attn[g, ld, ls][..., None] * v_in, accumulate=True
        )
        mixed = mixed.index_put(
            (g, ls), attn[g, ls, ld][..., None] * v_out, accumulate=True
        )
        h = h + self.out(mixed.reshape(num_graphs, size, self.node_dim)[mask])
        h = h + self.mlp(self.mlp_norm(h))
        update = self.edge_self(self.edge_norm(e)) + self.edge_src(h)[src]
        e = e + self.edge_out(F.silu(update + self.edge_dst(h)[dst]))
        return h, e

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}(node_dim={self.node_dim}, "
            f"edge_dim={self.edge_dim}, num_heads={self.num_heads})"
        )


class NeuralGraphTransformer(WeightSpaceModel):
    r"""NG-T (Kofinas et al. 2024): input features, encoders, a stack of
    :class:`RelationalAttentionLayer`, and the readouts of
    :class:`~lopt.weightspace.NeuralGraphGNN`.

    Args:
        num_layers (int, optional): attention layers. (default: ``2``)
        num_heads (int, optional): attention heads. (default: ``4``)
        edge_features, graph_out, node_dim, edge_dim, config, pooling,
            output_neurons: as in :class:`~lopt.weightspace.NeuralGraphGNN`,
            with the same defaults.

    Shapes:
        As :class:`~lopt.weightspace.NeuralGraphGNN`.
    """

    def __init__(
        self,
        edge_features: int,
        graph_out: int = 1,
        node_dim: int = 32,
        edge_dim: int = 8,
        num_layers: int = 2,
        num_heads: int = 4,
        config: WeightSpaceConfig | None = None,
        pooling: Sequence[str] = ("mean",),
        output_neurons: int = 1,
    ):
        super().__init__(
            edge_features,
            graph_out,
            node_dim,
            edge_dim,
            num_layers,
            config,
            pooling,
            output_neurons,
            num_heads=num_heads,
        )

    def build_body(self, node_in: int, edge_in: int, num_heads: int) -> None:
        node_dim, edge_dim, self.num_heads = self.node_dim, self.edge_dim, num_heads
        self.node_encoder = nn.Sequential(
            nn.Linear(node_in, node_dim),
            nn.SiLU(),
            nn.Linear(node_dim, node_dim),
        )
        self.edge_encoder = nn.Linear(edge_in, edge_dim)
        self.layers = nn.ModuleList(
            RelationalAttentionLayer(node_dim, edge_dim, num_heads)
            for _ in range(self.num_layers)
        )
        self.node_norm = nn.LayerNorm(node_dim)

    def reset_body(self) -> None:
        for module in (*self.node_encoder, self.edge_encoder):
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
        for layer in self.layers:
            layer.reset_parameters()
        self.node_norm.reset_parameters()

    def body(self, nodes, edges, data) -> tuple[torch.Tensor, torch.Tensor]:
        h, e = self.node_encoder(nodes), self.edge_encoder(edges)
        batch, num_graphs = graph_batch(data, h.shape[0])
        for layer in self.layers:
            h, e = layer(h, e, data.edge_index, batch, num_graphs)
        return self.node_norm(h), e

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_heads={self.num_heads}"
