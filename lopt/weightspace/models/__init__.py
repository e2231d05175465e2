"""Weight-space models over neural graphs: NG-GNN (:mod:`.gnn`), NG-T
(:mod:`.transformer`), their shared input featurizer (:mod:`.features`), probe
features (:mod:`.probes`) and readouts (:mod:`.readout`)."""

from lopt.weightspace.models.gnn import NeuralGraphGNN
from lopt.weightspace.models.transformer import NeuralGraphTransformer

__all__ = ["NeuralGraphGNN", "NeuralGraphTransformer"]
