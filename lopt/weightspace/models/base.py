"""The frame the weight-space models share: weight-space input features
(:class:`~lopt.weightspace.NeuralGraphFeaturizer`) in front of a body that
embeds nodes and edges, and the shared readouts
(:class:`~lopt.weightspace.models.readout.WeightSpaceReadout`) after it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict

import torch
from torch import nn

from lopt.weightspace.models.features import NeuralGraphFeaturizer, WeightSpaceConfig
from lopt.weightspace.models.readout import WeightSpaceOutput, WeightSpaceReadout

__all__ = ["WeightSpaceModel"]


class WeightSpaceModel(nn.Module):
    """Featurizer, body, readout: a subclass supplies the body.

    The featurizer, the body (:meth:`build_body`) and the readout are created
    in that order, then :meth:`reset_parameters` runs: parameters are
    registered, and drawn from the random generator, in that order.

    A subclass implements :meth:`build_body` (its modules and
    hyperparameters), :meth:`reset_body` and :meth:`body`, which maps the
    featurizer's node-major ``(N, node_in)`` and ``(E, edge_in)`` inputs to
    ``(N, node_dim)`` and ``(E, edge_dim)`` embeddings for the readout, and
    may extend :meth:`extra_repr`.

    The arguments are those of :class:`~lopt.weightspace.NeuralGraphGNN`;
    ``**body`` (further hyperparameters of the body, such as NG-T's
    ``num_heads``) is passed to :meth:`build_body`.
    """

    def __init__(
        self,
        edge_features: int,
        graph_out: int = 1,
        node_dim: int = 32,
        edge_dim: int = 8,
        num_layers: int = 3,
        config: WeightSpaceConfig | None = None,
        pooling: Sequence[str] = ("mean",),
        output_neurons: int = 1,
        **body,
    ):
        super().__init__()
        if edge_features < 1:
            raise ValueError(f"Invalid edge_features: {edge_features}")
        self.edge_features, self.graph_out = edge_features, graph_out
        self.node_dim, self.edge_dim, self.num_layers = node_dim, edge_dim, num_layers
        self.features = NeuralGraphFeaturizer(edge_features, config)
        self._body_options = dict(body)
        self.build_body(self.features.node_in, self.features.edge_in, **body)
        self.readout = WeightSpaceReadout(
            node_dim, edge_dim, edge_features, graph_out, pooling, output_neurons
        )
        self.reset_parameters()

    def build_body(self, node_in: int, edge_in: int, **body) -> None:
        raise NotImplementedError

    def reset_body(self) -> None:
        raise NotImplementedError

    def body(
        self, nodes: torch.Tensor, edges: torch.Tensor, data
    ) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    @property
    def config(self) -> WeightSpaceConfig:
        return self.features.config

    def get_config(self) -> dict:
        """The constructor's arguments, JSON-safe (``config`` as a dict):
        ``type(model).from_config(model.get_config())`` builds the same
        model, into which ``model.state_dict()`` loads."""
        return {
            "edge_features": self.edge_features,
            "graph_out": self.graph_out,
            "node_dim": self.node_dim,
            "edge_dim": self.edge_dim,
            "num_layers": self.num_layers,
            "config": asdict(self.config),
            "pooling": list(self.readout.pooling),
            "output_neurons": self.readout.output_neurons,
            **self._body_options,
        }

    @classmethod
    def from_config(cls, config: dict) -> WeightSpaceModel:
        """The model of :meth:`get_config`'s dict."""
        features = config.get("config")
        if isinstance(features, dict):
            config = {**config, "config": WeightSpaceConfig(**features)}
        return cls(**config)

    def reset_parameters(self) -> None:
        self.features.reset_parameters()
        self.reset_body()
        self.readout.reset_parameters()

    def forward(
        self, data, networks: nn.Module | Sequence[nn.Module] | None = None
    ) -> WeightSpaceOutput:
        nodes, edges = self.features(data, networks)
        h, e = self.body(nodes, edges, data)
        return self.readout(h, e, data.edge_index, data)

    def extra_repr(self) -> str:
        return (
            f"edge_features={self.edge_features}, graph_out={self.graph_out}, "
            f"node_dim={self.node_dim}, edge_dim={self.edge_dim}, "
            f"num_layers={self.num_layers}"
        )

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.extra_repr()})"
