"""Weight-space learning: networks as data, on neural graphs.

A network becomes a graph whose nodes are its neurons and whose edges are its
weights (:func:`to_graph`); graphs batch in PyTorch Geometric's conventions and
a graph network over them sees every architecture the same way, equivariant to
permutations of hidden neurons by construction.

Training: :class:`WeightSpaceTrainer` fits any of these models, or a
baseline of :mod:`lopt.weightspace.baselines`, on a :class:`WeightSpaceData`
split (classification, regression, editing).

Imports ``torch_geometric``; ``import lopt`` alone does not.
"""

from lopt.weightspace.graph.convert import graph_state, to_graph
from lopt.weightspace.graph.data import (
    ACTIVATIONS,
    LAYER_TYPES,
    NODE_FEATURES,
    NODE_ROLES,
    NeuralGraphData,
    ParamSpec,
    apply_graph_delta,
    from_graph_outputs,
)
from lopt.weightspace.graph.dataset import (
    NeuralGraphDataset,
    save_network,
    sequential_from_config,
)
from lopt.weightspace.models.features import (
    NeuralGraphFeaturizer,
    RandomFourierFeatures,
    WeightSpaceConfig,
    neuron_statistics,
)
from lopt.weightspace.models.gnn import NeuralGraphGNN
from lopt.weightspace.models.probes import probe_activations
from lopt.weightspace.models.readout import WeightSpaceOutput, WeightSpaceReadout
from lopt.weightspace.models.transformer import (
    NeuralGraphTransformer,
    RelationalAttentionLayer,
)
from lopt.weightspace.training import (
    FitResult,
    GraphPredictor,
    WeightSpaceData,
    WeightSpaceTrainer,
)

__all__ = [
    "to_graph",
    "graph_state",
    "NeuralGraphData",
    "ParamSpec",
    "from_graph_outputs",
    "apply_graph_delta",
    "NeuralGraphDataset",
    "sequential_from_config",
    "save_network",
    "NeuralGraphGNN",
    "NeuralGraphTransformer",
    "RelationalAttentionLayer",
    "WeightSpaceConfig",
    "neuron_statistics",
    "WeightSpaceOutput",
    "WeightSpaceReadout",
    "NeuralGraphFeaturizer",
    "RandomFourierFeatures",
    "probe_activations",
    "WeightSpaceData",
    "WeightSpaceTrainer",
    "GraphPredictor",
    "FitResult",
    "NODE_ROLES",
    "LAYER_TYPES",
    "ACTIVATIONS",
    "NODE_FEATURES",
]
