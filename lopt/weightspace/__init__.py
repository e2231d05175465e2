"""Weight-space learning: networks as data, on neural graphs.

A network becomes a graph whose nodes are its neurons and whose edges are its
weights (:func:`to_graph`); graphs batch in PyTorch Geometric's conventions and
a graph network over them sees every architecture the same way, equivariant to
permutations of hidden neurons by construction.

Training: :class:`WeightSpaceTrainer` fits any of these models, or a
baseline (:class:`StatNN`, :class:`StatNNTrees`, :class:`FlatWeightsMLP`,
:class:`NFNPredictor`, :class:`ProbePredictor`, :class:`ImagePredictor`), on
a :class:`WeightSpaceData` split (classification, regression scored by
:func:`kendall_tau`, editing). :func:`preset` gives the benchmark's best
models with their training recipes; :func:`save_predictor` and
:func:`load_predictor` keep a fitted one (safetensors + JSON).

Imports ``torch_geometric``; ``import lopt`` alone does not.
"""

from lopt.weightspace.baselines.nfn import NFNPredictor
from lopt.weightspace.baselines.predictors import (
    FeaturePredictor,
    FlatWeightsMLP,
    ImagePredictor,
    ProbePredictor,
    StatNN,
    StatNNTrees,
    weight_statistics,
)
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
from lopt.weightspace.graph.screening import SkippedNetwork
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
from lopt.weightspace.presets import PRESETS, WeightSpacePreset, preset
from lopt.weightspace.saving import load_predictor, save_predictor
from lopt.weightspace.training import (
    FitResult,
    GraphPredictor,
    WeightSpaceData,
    WeightSpaceTrainer,
    kendall_tau,
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
    "kendall_tau",
    "save_predictor",
    "load_predictor",
    "preset",
    "PRESETS",
    "WeightSpacePreset",
    "SkippedNetwork",
    # the baselines
    "StatNN",
    "StatNNTrees",
    "FlatWeightsMLP",
    "NFNPredictor",
    "ProbePredictor",
    "ImagePredictor",
    "FeaturePredictor",
    "weight_statistics",
    "NODE_ROLES",
    "LAYER_TYPES",
    "ACTIVATIONS",
    "NODE_FEATURES",
]
