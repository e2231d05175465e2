"""NG-GNN: the optimizer's graph backbone with weight-space inputs and
readouts.

The backbone (:class:`lopt.nn.GraphBackbone`, a stack of
:class:`lopt.nn.NGConv`) is used unchanged; this module puts the weight-space
input features in front of it (:class:`~lopt.weightspace.NeuralGraphFeaturizer`),
adapts PyG-style edge tensors to it (node-major ``(E, F)`` here,
channel-major ``(F, E)`` there) and the shared readouts after it
(:class:`~lopt.weightspace.models.readout.WeightSpaceReadout`).
"""

from __future__ import annotations

import torch

from lopt.nn import GraphBackbone
from lopt.weightspace.models.base import WeightSpaceModel

__all__ = ["NeuralGraphGNN"]


class NeuralGraphGNN(WeightSpaceModel):
    r"""NG-GNN (Kofinas et al. 2024) on :class:`lopt.nn.GraphBackbone`.

    Args:
        edge_features (int): ``F_edge`` of the graphs (``prod(kernel_shape)``).
        graph_out (int, optional): width of the graph-level output.
            (default: ``1``)
        node_dim (int, optional): node embedding width. (default: ``32``)
        edge_dim (int, optional): edge embedding width. (default: ``8``)
        num_layers (int, optional): message-passing layers. (default: ``3``,
            the benchmark's; see :mod:`lopt.weightspace.presets`)
        config (WeightSpaceConfig, optional): input features (positional,
            type and activation embeddings, Fourier features, probes).
            (default: ``WeightSpaceConfig()``: 16 Fourier features on graphs
            of scalar weights, none on conv kernels)
        pooling (sequence of str, optional): graph-level aggregations of the
            readout, from :data:`~lopt.weightspace.models.readout.POOLINGS`.
            (default: ``("mean",)``)
        output_neurons (int, optional): output neurons read by
            ``"output"`` pooling. (default: ``1``)

    Shapes:
        - **input:** a :class:`~lopt.weightspace.NeuralGraphData` or a batch
          of them (``x (N, F_node)``, ``edge_index (2, E)``,
          ``edge_attr (E, F_edge)``, ``batch (N,)``); with probes, the
          networks' architectures (one module, or one per graph)
        - **output:** :class:`~lopt.weightspace.WeightSpaceOutput`: graph
          ``(B, graph_out)``, node ``(N, F_node)``, edge ``(E, F_edge)``
    """

    def build_body(self, node_in: int, edge_in: int) -> None:
        self.backbone = GraphBackbone(
            node_in,
            edge_in,
            node_dim=self.node_dim,
            edge_dim=self.edge_dim,
            num_layers=self.num_layers,
        )

    def reset_body(self) -> None:
        self.backbone.reset_parameters()

    def body(self, nodes, edges, data) -> tuple[torch.Tensor, torch.Tensor]:
        h, e = self.backbone(nodes, data.edge_index, edges.T.contiguous())
        return h, e.T
