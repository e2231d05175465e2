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

from collections.abc import Sequence

from torch import nn

from lopt.nn import GraphBackbone
from lopt.weightspace.models.features import NeuralGraphFeaturizer, WeightSpaceConfig
from lopt.weightspace.models.readout import WeightSpaceOutput, WeightSpaceReadout

__all__ = ["NeuralGraphGNN"]


class NeuralGraphGNN(nn.Module):
    r"""NG-GNN (Kofinas et al. 2024) on :class:`lopt.nn.GraphBackbone`.

    Args:
        edge_features (int): ``F_edge`` of the graphs (``prod(kernel_shape)``).
        graph_out (int, optional): width of the graph-level output.
            (default: ``1``)
        node_dim (int, optional): node embedding width. (default: ``32``)
        edge_dim (int, optional): edge embedding width. (default: ``8``)
        num_layers (int, optional): message-passing layers. (default: ``2``)
        config (WeightSpaceConfig, optional): input features (positional,
            type and activation embeddings, Fourier features, probes).
            (default: ``WeightSpaceConfig()``)
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
        config: WeightSpaceConfig | None = None,
        pooling: Sequence[str] = ("mean",),
        output_neurons: int = 1,
    ):
        super().__init__()
        if edge_features < 1:
            raise ValueError(f"Invalid edge_features: {edge_features}")
        self.edge_features, self.graph_out = edge_features, graph_out
        self.features = NeuralGraphFeaturizer(edge_features, config)
        self.backbone = GraphBackbone(
            self.features.node_in,
            self.features.edge_in,
            node_dim=node_dim,
            edge_dim=edge_dim,
            num_layers=num_layers,
        )
        self.readout = WeightSpaceReadout(
            node_dim, edge_dim, edge_features, graph_out, pooling, output_neurons
        )
        self.reset_parameters()

    @property
    def config(self) -> WeightSpaceConfig:
        return self.features.config

    def reset_parameters(self) -> None:
        self.features.reset_parameters()
        self.backbone.reset_parameters()
        self.readout.reset_parameters()

    def forward(
        self, data, networks: nn.Module | Sequence[nn.Module] | None = None
    ) -> WeightSpaceOutput:
        nodes, edges = self.features(data, networks)
        h, e = self.backbone(nodes, data.edge_index, edges.T.contiguous())
        return self.readout(h, e.T, data.edge_index, data)

    def __repr__(self) -> str:
        b = self.backbone
        return (
            f"{self.__class__.__name__}(edge_features={self.edge_features}, "
            f"graph_out={self.graph_out}, node_dim={b.node_dim}, "
            f"edge_dim={b.edge_dim}, num_layers={b.num_layers})"
        )
