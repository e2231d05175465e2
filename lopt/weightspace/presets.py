"""Named presets: the weight-space benchmark's models and training recipes,
as one object each, so that a user trains the model its figures describe.

    from lopt.weightspace import preset

    trainer = preset("ng-gnn-best").trainer(train, "regression")
    trainer.fit(train, val)

A preset holds the model (NG-GNN or NG-T, widths, depth, readout and
:class:`~lopt.weightspace.WeightSpaceConfig`) and the trainer's settings;
:meth:`WeightSpacePreset.build_model` sizes the model for a split's graphs
(edge features, outputs). The benchmark (``benchmarks/weightspace/run.py``)
builds its NG models from these presets, and a test checks that each preset
equals the model and settings of the benchmark command it names.

=============== ======================================================== =======
preset          what (benchmark model key, run)                          figure
=============== ======================================================== =======
``ng-gnn-best`` NG-GNN +qstats +LN edges (``ng_gnn_qstats_ln``, W21)     0.765
``ng-gnn``      NG-GNN (``ng_gnn``, W21)                                  0.686
``ng-t``        NG-T (``ng_t``, the default run)                          0.578
=============== ======================================================== =======

Figures: Kendall's tau of predicted against held-out accuracy on cnn_wild's
unseen architecture families (test split, mean of 3 seeds; NG-T on the
earlier 96-architecture zoo), from ``benchmarks/weightspace/README.md``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from lopt.weightspace.models.base import WeightSpaceModel
from lopt.weightspace.models.features import WeightSpaceConfig
from lopt.weightspace.models.gnn import NeuralGraphGNN
from lopt.weightspace.models.transformer import NeuralGraphTransformer
from lopt.weightspace.splits import WeightSpaceData

__all__ = ["WeightSpacePreset", "PRESETS", "preset"]

_MODELS = {"ng_gnn": NeuralGraphGNN, "ng_t": NeuralGraphTransformer}


@dataclass(frozen=True)
class WeightSpacePreset:
    """A model and its training recipe, as the benchmark ran them.

    Attributes:
        name: the preset's name.
        description: what it is, and the figure it scored.
        model: ``"ng_gnn"`` (:class:`~lopt.weightspace.NeuralGraphGNN`) or
            ``"ng_t"`` (:class:`~lopt.weightspace.NeuralGraphTransformer`).
        model_kwargs: the model's widths, depth and readout (``node_dim``,
            ``edge_dim``, ``num_layers``, ``pooling``; NG-T's
            ``num_heads``).
        config: its input features; ``fourier_features=None`` resolves per
            graph (16 on scalar weights, 0 on kernels).
        trainer_kwargs: :class:`~lopt.weightspace.WeightSpaceTrainer`
            settings.
        benchmark_model: the benchmark's key for this model.
        benchmark_flags: the command-line flags of the benchmark run that
            gave its figure (the trainer's settings are those flags applied
            to the full settings).
    """

    name: str
    description: str
    model: str
    model_kwargs: dict[str, Any]
    config: WeightSpaceConfig
    trainer_kwargs: dict[str, Any]
    benchmark_model: str
    benchmark_flags: tuple[str, ...] = field(default=())

    def build_model(
        self,
        edge_features: int,
        graph_out: int = 1,
        output_neurons: int = 1,
        **overrides,
    ) -> WeightSpaceModel:
        """The preset's model for graphs of ``edge_features`` per edge
        (``WeightSpaceData.edge_features``), with ``graph_out`` outputs
        (classes, or 1 for regression); ``overrides`` replace its keyword
        arguments (``node_dim=64``, ``config=...``)."""
        kwargs = {**self.model_kwargs, "config": self.config, **overrides}
        return _MODELS[self.model](
            edge_features, graph_out, output_neurons=output_neurons, **kwargs
        )

    def trainer(self, train: WeightSpaceData, task: str = "regression", **overrides):
        """A :class:`~lopt.weightspace.WeightSpaceTrainer` of the preset's
        model, sized for ``train`` (as many outputs as its classes for
        classification), with the preset's settings; ``overrides`` replace
        trainer settings (``epochs=10``, ``max_seconds=None``).

        Raises:
            ValueError: ``train`` has networks with more inputs or outputs
                than the model's ``max_positions`` (the message says what to
                pass).
        """
        from lopt.weightspace.training import WeightSpaceTrainer

        if not isinstance(train, WeightSpaceData):
            raise TypeError(f"train must be a WeightSpaceData, got {type(train)}")
        classes = task == "classification" and train.y is not None
        graph_out = int(train.y.max()) + 1 if classes else 1
        model = self.build_model(train.edge_features, graph_out, train.output_neurons)
        model.features.check_positions(train.graphs)
        return WeightSpaceTrainer(model, task, **{**self.trainer_kwargs, **overrides})

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: everything, the config as a dict."""
        return {**asdict(self), "config": asdict(self.config)}


#: The full settings of the benchmark's trainer that no preset changes.
_FULL_TRAINING = {"lr": 1e-3, "epochs": 60, "batch_size": 32, "lr_patience": None}
#: The flags of the W21 runs (cnn_wild, 288 architectures).
_W21 = ("--grad-clip", "1", "--patience", "20", "--max-seconds", "700")
_W21_TRAINING = {
    **_FULL_TRAINING,
    "patience": 20,
    "grad_clip": 1.0,
    "max_seconds": 700.0,
}
_GNN = {"node_dim": 32, "edge_dim": 8, "num_layers": 3, "pooling": ("mean",)}

PRESETS: dict[str, WeightSpacePreset] = {
    p.name: p
    for p in (
        WeightSpacePreset(
            "ng-gnn-best",
            "NG-GNN +qstats +LN edges: per-neuron weight statistics scaled "
            "through their training quantiles, edges divided by their layer's "
            "RMS; tau 0.765 on cnn_wild's unseen families (W21)",
            "ng_gnn",
            _GNN,
            WeightSpaceConfig(
                neuron_statistics=True,
                statistics_scaling="quantile",
                layer_normalised_edges=True,
            ),
            _W21_TRAINING,
            "ng_gnn_qstats_ln",
            _W21,
        ),
        WeightSpacePreset(
            "ng-gnn",
            "NG-GNN, the paper's inputs; tau 0.686 on cnn_wild's unseen families (W21)",
            "ng_gnn",
            _GNN,
            WeightSpaceConfig(),
            _W21_TRAINING,
            "ng_gnn",
            _W21,
        ),
        WeightSpacePreset(
            "ng-t",
            "NG-T, the paper's inputs; tau 0.578 on the 96-architecture "
            "cnn_wild's unseen families (the benchmark's default settings)",
            "ng_t",
            {**_GNN, "num_layers": 2, "num_heads": 4},
            WeightSpaceConfig(),
            {**_FULL_TRAINING, "patience": 10, "grad_clip": None, "max_seconds": 300.0},
            "ng_t",
        ),
    )
}


def preset(name: str, **changes) -> WeightSpacePreset:
    """The preset ``name`` of :data:`PRESETS`, with ``changes`` to its
    fields (``dataclasses.replace``).

    Raises:
        ValueError: an unknown name.
    """
    if name not in PRESETS:
        raise ValueError(f"Invalid preset: {name!r} (expected one of {list(PRESETS)})")
    return replace(PRESETS[name], **changes) if changes else PRESETS[name]
