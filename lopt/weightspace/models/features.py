"""What a weight-space model sees of a neural graph: the input features the
paper found matter (Kofinas et al. 2024, section 4 and the ablations), each
behind a flag of :class:`WeightSpaceConfig` so that a benchmark can ablate it.

* **Positional embeddings** of input and output neurons: a learned vector per
  position (an INR's x and y inputs, a classifier's classes). Hidden neurons
  get none (zeros), so they stay interchangeable and the model stays
  equivariant to their permutations.
* **Layer-type and activation embeddings**: learned vectors per entry of
  :data:`~lopt.weightspace.LAYER_TYPES` (nodes and edges) and
  :data:`~lopt.weightspace.ACTIVATIONS` (nodes). The paper found the
  activation embedding matters on zoos that mix activations.
* **Random Fourier features** of every scalar weight, bias and statistic:
  :math:`w \\mapsto [\\sin(2\\pi b_k w), \\cos(2\\pi b_k w)]_{k=1..K}`.
* **Probe features**: each neuron's activation on learned probe inputs
  (:mod:`lopt.weightspace.models.probes`).
* **Neuron statistics** (not in the paper; what StatNN, Unterthiner et al.
  2020, reads, made per neuron): each neuron's in- and out-weight statistics
  and its layer's weight and bias statistics, as node inputs
  (:func:`neuron_statistics`).
* **Sign canonicalisation** (not in the paper; the sign symmetry that Scale
  Equivariant Graph Metanetworks, Kalogeropoulos et al. 2024, build in): a
  hidden neuron with an odd activation (``sin``, ``tanh``) computes the same
  function with its incoming weights, bias and outgoing weights negated, so
  each such neuron is read with its bias made non-negative. Networks that
  differ only by such flips then give identical inputs.

A neuron's role (input, hidden, output, standalone) is always given, one-hot:
it is what the graph's symmetry leaves visible, not a positional feature.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from lopt.weightspace.graph.data import (
    ACTIVATIONS,
    LAYER_TYPES,
    NODE_FEATURES,
    NODE_ROLES,
)
from lopt.weightspace.models.probes import probe_activations
from lopt.weightspace.models.readout import deepest_layer, graph_batch

__all__ = [
    "WeightSpaceConfig",
    "RandomFourierFeatures",
    "NeuralGraphFeaturizer",
    "canonical_signs",
    "neuron_statistics",
    "NEURON_STATISTICS",
    "quantile_scale",
    "layer_rms",
    "STATISTICS_SCALINGS",
    "adopt_buffer_shapes",
    "AUTO_FOURIER_FEATURES",
]

_INPUT, _OUTPUT = NODE_ROLES.index("input"), NODE_ROLES.index("output")
_HIDDEN = NODE_ROLES.index("hidden")
#: Activations with f(-z) = -f(z): a neuron with one can be sign-flipped.
_ODD = tuple(ACTIVATIONS.index(a) for a in ("sin", "tanh"))
#: Layer types whose neurons are an affine map of the previous layer, and
#: edges through which a sign flip passes linearly into the next neuron.
_AFFINE = tuple(LAYER_TYPES.index(t) for t in ("linear", "conv", "flatten_linear"))
_BIAS = NODE_FEATURES.index("bias")


def canonical_signs(data) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, edge_attr)`` of ``data`` with every sign-flippable hidden neuron
    flipped so that its bias is non-negative.

    A neuron is flippable when it is hidden, has an odd activation (``sin``,
    ``tanh``), is an affine layer's neuron (linear or conv), and all of its
    incoming and outgoing edges are affine layers' weights (no residual
    identity or norm edge, through which a negation would not cancel).
    Flipping negates its bias, its incoming and its outgoing weights: the
    network's function does not change. The choice depends on the neuron's
    own bias only, so it commutes with permutations of hidden neurons. A bias
    of exactly zero is left as it is.
    """
    x, edge_attr = data.x, data.edge_attr
    src, dst = data.edge_index
    affine = torch.tensor(_AFFINE, device=x.device)
    odd = torch.isin(data.node_act, torch.tensor(_ODD, device=x.device))
    affine_node = torch.isin(data.node_type, affine)
    affine_edge = torch.isin(data.edge_type, affine)
    # Nodes with an incoming or outgoing edge that is not an affine weight.
    blocked = torch.zeros_like(odd)
    blocked[src[~affine_edge]] = True
    blocked[dst[~affine_edge]] = True
    flippable = (data.node_role == _HIDDEN) & odd & affine_node & ~blocked
    sign = torch.where(flippable & (x[:, _BIAS] < 0), -1.0, 1.0).to(x.dtype)
    x = x.clone()
    x[:, _BIAS] = x[:, _BIAS] * sign
    edge_attr = edge_attr * (sign[src] * sign[dst]).to(edge_attr.dtype)[:, None]
    return x, edge_attr


#: Columns of :func:`neuron_statistics`. ``in_*`` / ``out_*``: over every
#: scalar of a neuron's incoming / outgoing edges (all kernel entries);
#: ``layer_*``: over the edges into, and the biases of, every neuron of the
#: same graph at the same depth; ``rel_depth``: depth over the graph's
#: deepest node; ``log_depth``: log(1 + that deepest depth).
NEURON_STATISTICS = (
    "in_mean",
    "in_std",
    "in_abs",
    "in_max",
    "in_log_degree",
    "out_mean",
    "out_std",
    "out_abs",
    "out_max",
    "out_log_degree",
    "layer_mean",
    "layer_std",
    "layer_abs",
    "layer_bias_mean",
    "layer_bias_std",
    "layer_log_size",
    "rel_depth",
    "log_depth",
)


def _group_moments(
    values: torch.Tensor, index: torch.Tensor, size: int, per_row: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean, std, mean absolute value and row count per group: ``values
    (n, per_row)`` are ``per_row`` scalars of one row, ``index (n,)`` its
    group."""
    sums = values.new_zeros(size, 3).index_add_(
        0,
        index,
        torch.stack(
            [values.sum(1), (values * values).sum(1), values.abs().sum(1)], dim=1
        ),
    )
    rows = torch.bincount(index, minlength=size).to(values.dtype)
    count = (rows * per_row).clamp(min=1)
    mean, sq, absolute = (sums / count[:, None]).unbind(1)
    std = (sq - mean * mean).clamp(min=0).sqrt()
    return mean, std, absolute, rows


#: How :class:`NeuralGraphFeaturizer` puts neuron statistics on one scale.
STATISTICS_SCALINGS = ("standard", "quantile")


def quantile_scale(values: torch.Tensor, knots: torch.Tensor) -> torch.Tensor:
    """Each column of ``values (N, C)`` mapped through its empirical
    distribution function, given by ``knots (K, C)`` (the column's quantiles at
    ``K`` evenly spaced levels, non-decreasing down each column), to
    ``[-sqrt(3), sqrt(3)]``: uniform, with unit variance, on values distributed
    as the knots were fitted on.

    Knot ``j`` sits at level ``j / (K - 1)``, except that a run of equal knots
    (a value many networks share) sits at the mean level of the run, so the
    map is continuous: linear between knots, flat beyond the first and last.
    It is monotone, so a heavy-tailed column (the weight scale of the few
    networks trained at a high learning rate) keeps its order but no longer
    squeezes every typical value into a sliver of the range, which is what
    standardisation does to it.
    """
    if knots.dim() != 2 or knots.shape[0] < 2 or knots.shape[1] != values.shape[1]:
        raise ValueError(
            f"knots must be (K >= 2, {values.shape[1]}), got {tuple(knots.shape)}"
        )
    k = knots.T.contiguous().to(values.dtype)  # (C, K)
    v = values.T.contiguous()  # (C, N)
    last = k.shape[1] - 1
    # Level of each knot: j / (K - 1), averaged over runs of equal knots.
    start = torch.ones_like(k, dtype=torch.bool)
    start[:, 1:] = k[:, 1:] != k[:, :-1]
    run = start.long().cumsum(1) - 1
    level = torch.linspace(0, 1, last + 1, dtype=v.dtype).expand_as(k)
    total = torch.zeros_like(k).scatter_add_(1, run, level)
    count = torch.zeros_like(k).scatter_add_(1, run, torch.ones_like(k))
    level = (total / count.clamp(min=1)).gather(1, run)
    i = torch.searchsorted(k, v, right=True).clamp(1, last)
    lo, hi = k.gather(1, i - 1), k.gather(1, i)
    frac = ((v - lo) / (hi - lo).clamp(min=torch.finfo(v.dtype).tiny)).clamp(0, 1)
    low = level.gather(1, i - 1)
    out = low + frac * (level.gather(1, i) - low)
    return ((2 * out - 1) * math.sqrt(3.0)).T


def neuron_statistics(
    data, x: torch.Tensor | None = None, edge_attr: torch.Tensor | None = None
) -> torch.Tensor:
    """``(N, len(NEURON_STATISTICS))`` per-neuron statistics of a graph or
    batch (columns: :data:`NEURON_STATISTICS`), from ``x`` and ``edge_attr``
    (default: the graph's own).

    Every column is a symmetric function of a neuron's own edges, or of all
    neurons of its layer, or of its depth, so permuting hidden neurons
    permutes the rows and changes nothing else. A message-passing model could
    in principle compute them; given as inputs, it need not learn the
    per-layer scale statistics that make StatNN a strong baseline for
    generalization prediction.

    Statistics are over every entry of ``edge_attr``: in a batch whose
    kernels were padded to one size (``to_graph(kernel_size=...)``), a smaller
    kernel's padding counts as zeros, so its means and stds are those of the
    padded kernel.
    """
    x = data.x if x is None else x
    edge_attr = data.edge_attr if edge_attr is None else edge_attr
    src, dst = data.edge_index
    n, per_edge = x.shape[0], edge_attr.shape[1]
    batch, graphs = graph_batch(data, n)
    depth = data.node_layer
    deepest = deepest_layer(data, batch, graphs)
    edge_max = edge_attr.abs().amax(1)
    cols = []
    for index in (dst, src):
        mean, std, absolute, degree = _group_moments(edge_attr, index, n, per_edge)
        peak = edge_max.new_zeros(n).scatter_reduce(
            0, index, edge_max, "amax", include_self=True
        )
        cols += [mean, std, absolute, peak, degree.log1p()]
    levels = int(depth.max()) + 1 if n else 1
    group = batch * levels + depth
    groups = graphs * levels
    mean, std, absolute, _ = _group_moments(edge_attr, group[dst], groups, per_edge)
    bias = x[:, _BIAS : _BIAS + 1]
    b_mean, b_std, _, size = _group_moments(bias, group, groups, 1)
    cols += [
        mean[group],
        std[group],
        absolute[group],
        b_mean[group],
        b_std[group],
        size[group].log1p(),
        depth.to(x.dtype) / deepest[batch].clamp(min=1).to(x.dtype),
        deepest[batch].to(x.dtype).log1p(),
    ]
    return torch.stack(cols, dim=1)


def _column_quantiles(values: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """``(len(levels), C)`` quantiles of each column of ``values (N, C)``;
    ``torch.quantile`` refuses more than 16M values, so large inputs are
    subsampled evenly (deterministic)."""
    limit = (1 << 24) // max(values.shape[1], 1)
    if len(values) > limit:
        values = values[torch.linspace(0, len(values) - 1, limit).long()]
    return torch.quantile(values, levels.to(values.dtype), dim=0)


def layer_rms(data, edge_attr: torch.Tensor | None = None) -> torch.Tensor:
    """``(E,)``: the root mean square of ``edge_attr`` (default: the graph's
    own) over the edges of each edge's own graph, target depth and edge type
    (a layer's weights, its shortcut's, its norm's: each apart). Symmetric in
    a layer's neurons, so dividing by it keeps a model equivariant."""
    edge_attr = data.edge_attr if edge_attr is None else edge_attr
    dst = data.edge_index[1]
    batch, graphs = graph_batch(data, data.x.shape[0])
    depth = data.node_layer
    levels = int(depth.max()) + 1 if len(depth) else 1
    types = len(LAYER_TYPES)
    group = ((batch[dst] * levels + depth[dst]) * types) + data.edge_type
    mean, std, _, _ = _group_moments(
        edge_attr, group, graphs * levels * types, edge_attr.shape[1]
    )
    return (mean * mean + std * std).sqrt()[group]


def adopt_buffer_shapes(
    module: nn.Module, state_dict, prefix: str, names: Sequence[str]
) -> None:
    """Give each buffer ``names`` of ``module`` the shape of its entry in
    ``state_dict`` (keeping its dtype), before the state_dict is loaded.

    For buffers that fitting sizes (input scales, quantile knots, a tree
    ensemble's nodes): a fresh module holds empty ones, and without this its
    ``load_state_dict`` would refuse a fitted model's.
    """
    for name in names:
        value = state_dict.get(prefix + name)
        if isinstance(value, torch.Tensor):
            setattr(module, name, getattr(module, name).new_empty(value.shape))


#: Fourier features per scalar that ``fourier_features=None`` gives graphs of
#: scalar weights (the weight-space benchmark's ``--fourier`` default).
AUTO_FOURIER_FEATURES = 16


@dataclass(frozen=True)
class WeightSpaceConfig:
    """Which input features a weight-space model uses (defaults: the paper's
    model without probes).

    ``statistics_scaling="quantile"`` and ``layer_normalised_edges``, with
    ``neuron_statistics``, make the benchmark's best model (preset
    ``"ng-gnn-best"``, :mod:`lopt.weightspace.presets`); they are off by
    default, where the paper's inputs are. Their helpers
    (:func:`quantile_scale`, :func:`layer_rms`, and :func:`canonical_signs`
    of ``sign_canonical``) are importable from this module only, not from
    :mod:`lopt.weightspace`.

    Attributes:
        positional: learned embeddings of input and output neurons' positions.
        max_positions: size of each positional table (input and output
            positions must be below it).
        activation_embedding: learned embedding of each neuron's activation.
        layer_embedding: learned embedding of each neuron's and edge's layer
            type.
        embedding_dim: width of every learned embedding.
        fourier_features: ``K``, frequencies per scalar; ``0`` gives the raw
            scalars only. With ``K > 0`` each scalar becomes ``2K + 1``
            inputs: itself, then its sines and cosines. ``None`` (the
            default) picks the weight-space benchmark's rule when the model
            is built: :data:`AUTO_FOURIER_FEATURES` (16) on graphs of scalar
            weights (``edge_features == 1``: MLPs, INRs, where without them
            NG-GNN did not learn INR classification), ``0`` on conv kernels
            (whose edge input would grow 33-fold); the model's ``config``
            then holds the number chosen.
        fourier_scale: standard deviation of the frequencies ``b_k``, in
            cycles per unit of weight: ``1`` resolves weights of order one.
        fourier_seed: seed of the frequencies (fixed, not learned).
        probes: number of learned probe inputs; ``0`` turns probes off.
        probe_shape: the shape of one network input, e.g. ``(2,)`` for an INR
            of 2-D coordinates or ``(1, 8, 8)`` for a small CNN.
        input_clip: once input scales are fitted
            (:meth:`NeuralGraphFeaturizer.fit_input_scales`), scaled node and
            edge inputs are clamped to ``[-input_clip, input_clip]`` standard
            deviations; ``None``: never. A diverged network in a zoo (weights
            of 1e10) otherwise overflows float32 inside the model and every
            prediction of its batch becomes NaN; no typical weight is 100
            standard deviations out, so typical networks are unchanged.
        sign_canonical: read each sign-flippable hidden neuron with its bias
            made non-negative (:func:`canonical_signs`).
        neuron_statistics: per-neuron weight statistics as node inputs
            (:func:`neuron_statistics`).
        statistics_scaling: how the statistics are put on
            one scale once fitted: ``"standard"`` (minus the mean, over the
            standard deviation, clamped by ``input_clip``) or ``"quantile"``
            (through their empirical distribution on the fitting graphs,
            :func:`quantile_scale`; robust to heavy tails).
        statistics_quantiles: knots per column for
            ``"quantile"``.
        layer_normalised_edges: divide each network's edge
            inputs by their root mean square over its layer
            (:func:`layer_rms`), so that edges carry the pattern of a layer's
            weights and not their scale (which the neuron statistics,
            computed before, still carry).
    """

    positional: bool = True
    max_positions: int = 64
    activation_embedding: bool = True
    layer_embedding: bool = True
    embedding_dim: int = 8
    fourier_features: int | None = None
    fourier_scale: float = 1.0
    fourier_seed: int = 0
    probes: int = 0
    probe_shape: tuple[int, ...] = ()
    input_clip: float | None = 100.0
    sign_canonical: bool = False
    neuron_statistics: bool = False
    statistics_scaling: str = "standard"
    statistics_quantiles: int = 101
    layer_normalised_edges: bool = False

    def __post_init__(self):
        if self.max_positions < 1:
            raise ValueError(f"Invalid max_positions: {self.max_positions}")
        if self.embedding_dim < 1:
            raise ValueError(f"Invalid embedding_dim: {self.embedding_dim}")
        if self.fourier_features is not None and self.fourier_features < 0:
            raise ValueError(f"Invalid fourier_features: {self.fourier_features}")
        if not self.fourier_scale > 0:
            raise ValueError(f"Invalid fourier_scale: {self.fourier_scale}")
        if self.probes < 0:
            raise ValueError(f"Invalid probes: {self.probes}")
        if self.input_clip is not None and not self.input_clip > 0:
            raise ValueError(f"Invalid input_clip: {self.input_clip}")
        if self.statistics_scaling not in STATISTICS_SCALINGS:
            raise ValueError(
                f"Invalid statistics_scaling: {self.statistics_scaling!r} "
                f"(expected one of {STATISTICS_SCALINGS})"
            )
        if self.statistics_quantiles < 2:
            raise ValueError(
                f"Invalid statistics_quantiles: {self.statistics_quantiles}"
            )
        object.__setattr__(self, "probe_shape", tuple(self.probe_shape))
        if self.probes and not self.probe_shape:
            raise ValueError("probes need probe_shape, the shape of one input")

    def for_edges(self, edge_features: int) -> WeightSpaceConfig:
        """This config with ``fourier_features=None`` resolved for graphs of
        ``edge_features`` scalars per edge (see ``fourier_features``)."""
        if self.fourier_features is not None:
            return self
        auto = AUTO_FOURIER_FEATURES if edge_features == 1 else 0
        return replace(self, fourier_features=auto)


class RandomFourierFeatures(nn.Module):
    r"""Elementwise random Fourier features of scalars.

    .. math::
        \phi(w) = [w,\ \sin(2\pi b_1 w), \dots, \sin(2\pi b_K w),\
        \cos(2\pi b_1 w), \dots, \cos(2\pi b_K w)],
        \qquad b_k \sim \mathcal{N}(0, \sigma^2)

    with ``b`` drawn once from ``seed`` and kept as a buffer (saved in the
    state_dict, moved with the module, never trained).

    Args:
        num_features (int): ``K``.
        scale (float, optional): :math:`\sigma`. (default: ``1.0``)
        seed (int, optional): seed of ``b``. (default: ``0``)

    Shapes:
        - **input:** :math:`(*, F)`
        - **output:** :math:`(*, F (2K + 1))`: for each input column, its
          value, ``K`` sines and ``K`` cosines, next to each other
    """

    def __init__(self, num_features: int, scale: float = 1.0, seed: int = 0):
        super().__init__()
        if num_features < 1:
            raise ValueError(f"Invalid num_features: {num_features}")
        self.num_features, self.scale, self.seed = num_features, scale, seed
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("frequencies", torch.randn(num_features, generator=gen))
        self.frequencies.mul_(scale)

    def out_features(self, in_features: int) -> int:
        return in_features * (2 * self.num_features + 1)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        angle = (2 * math.pi) * w[..., None] * self.frequencies.to(w.dtype)
        out = torch.cat([w[..., None], angle.sin(), angle.cos()], dim=-1)
        return out.flatten(-2)

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}({self.num_features}, scale={self.scale}, "
            f"seed={self.seed})"
        )


class NeuralGraphFeaturizer(nn.Module):
    """Node and edge inputs of a weight-space model, per
    :class:`WeightSpaceConfig`.

    Node inputs, in order: ``x`` (or its Fourier features), the role one-hot,
    then, where enabled, the layer-type, activation and positional embeddings,
    the probe values and the neuron statistics. Edge inputs: ``edge_attr``
    (or its Fourier features) and the layer-type embedding.

    Args:
        edge_features (int): ``F_edge`` of the graphs.
        config (WeightSpaceConfig, optional): which features; kept as
            ``self.config`` with ``fourier_features=None`` resolved
            (:meth:`WeightSpaceConfig.for_edges`). (default: the defaults of
            :class:`WeightSpaceConfig`)

    Shapes:
        - **input:** a graph or batch (and the networks, with probes)
        - **output:** node inputs ``(N, node_in)``, edge inputs
          ``(E, edge_in)``
    """

    def __init__(self, edge_features: int, config: WeightSpaceConfig | None = None):
        super().__init__()
        if edge_features < 1:
            raise ValueError(f"Invalid edge_features: {edge_features}")
        config = config if config is not None else WeightSpaceConfig()
        self.config = config = config.for_edges(edge_features)
        self.edge_features = edge_features
        dim = config.embedding_dim
        self.fourier = (
            RandomFourierFeatures(
                config.fourier_features, config.fourier_scale, config.fourier_seed
            )
            if config.fourier_features
            else None
        )
        widen = self.fourier.out_features if self.fourier else (lambda f: f)
        self.node_in = widen(len(NODE_FEATURES)) + len(NODE_ROLES)
        self.edge_in = widen(edge_features)
        if config.layer_embedding:
            self.node_layer_embedding = nn.Embedding(len(LAYER_TYPES), dim)
            self.edge_layer_embedding = nn.Embedding(len(LAYER_TYPES), dim)
            self.node_in += dim
            self.edge_in += dim
        if config.activation_embedding:
            self.activation_embedding = nn.Embedding(len(ACTIVATIONS), dim)
            self.node_in += dim
        if config.positional:
            # Rows [0, max) are input positions, [max, 2 max) output ones.
            self.position_embedding = nn.Embedding(2 * config.max_positions, dim)
            self.node_in += dim
        if config.probes:
            self.probe_inputs = nn.Parameter(
                torch.empty(config.probes, *config.probe_shape)
            )
            self.node_in += config.probes
        if config.neuron_statistics:
            self.node_in += len(NEURON_STATISTICS)
        # Input scales per layer depth (row d + 1 for depth d, row 0 for
        # depths not seen when fitted); empty: no scaling.
        self.register_buffer("node_scale", torch.ones(0))
        self.register_buffer("edge_scale", torch.ones(0))
        # Standardisation of the neuron statistics; empty: none.
        self.register_buffer("stat_shift", torch.zeros(0))
        self.register_buffer("stat_scale", torch.ones(0))
        # Or their quantiles per column (statistics_scaling="quantile").
        self.register_buffer("stat_knots", torch.zeros(0))
        self.reset_parameters()

    @torch.no_grad()
    def fit_input_scales(self, data) -> None:
        """Divide ``x`` and ``edge_attr`` from now on by the standard
        deviation of each of their columns among the nodes (edges into the
        nodes) of each layer depth of ``data`` (a batch of typical graphs).

        Depth is not changed by permuting neurons, so the model stays
        equivariant. It puts layers of very different weight scales (an INR's
        first layer of order 1, its hidden layers of order 1 / w0) on one
        scale. Probes still run the networks with their own weights.
        """
        node_depth = data.node_layer
        edge_depth = node_depth[data.edge_index[1]]
        depths = int(node_depth.max()) + 2

        def scales(values: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
            out = values.new_ones(depths, values.shape[1])
            if len(values) > 1:
                out[0] = values.std(0)
            for d in range(depths - 1):
                rows = values[depth == d]
                if len(rows) > 1:
                    out[d + 1] = rows.std(0)
            return torch.where(out > 1e-8, out, torch.ones_like(out))

        x, edge_attr = self._signed(data)
        self.node_scale = scales(x.float(), node_depth)
        self.edge_scale = scales(edge_attr.float(), edge_depth)
        if self.config.neuron_statistics:
            stats = neuron_statistics(data, *self._scaled(data)).float()
            if self.config.statistics_scaling == "quantile":
                levels = torch.linspace(0, 1, self.config.statistics_quantiles)
                self.stat_knots = _column_quantiles(stats, levels)
                return
            self.stat_shift = stats.mean(0)
            std = stats.std(0) if len(stats) > 1 else torch.ones_like(stats[0])
            self.stat_scale = torch.where(std > 1e-8, std, torch.ones_like(std))

    #: Buffers set by :meth:`fit_input_scales`, empty until then.
    _FITTED = ("node_scale", "edge_scale", "stat_shift", "stat_scale", "stat_knots")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A fitted model's scales have shapes a fresh model cannot know: take
        # them from the state_dict, so a saved predictor loads into a new one.
        adopt_buffer_shapes(self, state_dict, prefix, self._FITTED)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _signed(self, data) -> tuple[torch.Tensor, torch.Tensor]:
        if self.config.sign_canonical:
            return canonical_signs(data)
        return data.x, data.edge_attr

    def _scaled(self, data) -> tuple[torch.Tensor, torch.Tensor]:
        x, edge_attr = self._signed(data)
        if not len(self.node_scale):
            return x, edge_attr
        known = self.node_scale.shape[0] - 1
        node_depth = data.node_layer
        node_row = torch.where(node_depth < known, node_depth + 1, 0)
        edge_row = node_row[data.edge_index[1]]
        x = x / self.node_scale[node_row]
        edge_attr = edge_attr / self.edge_scale[edge_row]
        clip = self.config.input_clip
        if clip is not None:
            x, edge_attr = x.clamp(-clip, clip), edge_attr.clamp(-clip, clip)
        return x, edge_attr

    def reset_parameters(self) -> None:
        for module in self.children():
            if isinstance(module, nn.Embedding):
                module.reset_parameters()
        if self.config.probes:
            # The range of an INR's coordinates; inputs of other networks are
            # normalised to about this scale too.
            nn.init.uniform_(self.probe_inputs, -1.0, 1.0)

    def check_positions(self, graphs: Sequence) -> None:
        """Raise ``ValueError`` naming ``max_positions`` when a graph of
        ``graphs`` has more input or output neurons than the positional
        tables hold (called by :meth:`GraphPredictor.prepare
        <lopt.weightspace.GraphPredictor.prepare>`, so that a fit fails
        before its first epoch). Nothing to check without positional
        embeddings."""
        if not self.config.positional or not len(graphs):
            return
        roles = torch.cat([g.node_role for g in graphs])
        pos = torch.cat([g.node_pos for g in graphs])
        has = (roles == _INPUT) | (roles == _OUTPUT)
        counts = torch.tensor([g.num_nodes for g in graphs])
        graph = torch.repeat_interleave(torch.arange(len(graphs)), counts)
        over = has & (pos >= self.config.max_positions)
        if bool(over.any()):
            first = int(graph[over][0])
            widest = int(pos[has].max()) + 1
            raise ValueError(
                f"Invalid max_positions: {self.config.max_positions}, but "
                f"network {first} has an input or output neuron at position "
                f"{int(pos[over & (graph == first)].max())} (the widest has "
                f"{widest} inputs or outputs); build the model with "
                f"WeightSpaceConfig(max_positions={widest}), or "
                "positional=False"
            )

    def positions(self, data) -> tuple[torch.Tensor, torch.Tensor]:
        """Row of the positional table for each node, and which nodes have
        one (input and output neurons)."""
        limit = self.config.max_positions
        has = (data.node_role == _INPUT) | (data.node_role == _OUTPUT)
        pos = data.node_pos[has]
        if len(pos) and int(pos.max()) >= limit:
            raise ValueError(
                f"Invalid max_positions: a graph has an input or output neuron "
                f"at position {int(pos.max())}, beyond max_positions={limit}; "
                f"use WeightSpaceConfig(max_positions={int(pos.max()) + 1}) or more"
            )
        row = data.node_pos.clamp(min=0) + limit * (data.node_role == _OUTPUT)
        return torch.where(has, row, 0), has

    def forward(
        self, data, networks: nn.Module | Sequence[nn.Module] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``networks``: the architecture(s) of the graphs, needed with
        probes only (see :func:`~lopt.weightspace.probe_activations`)."""
        if data.edge_attr.shape[1] != self.edge_features:
            raise ValueError(
                f"graphs have {data.edge_attr.shape[1]} edge features, the model "
                f"expects {self.edge_features} (pass the same kernel_size to "
                "to_graph for every network)"
            )
        config = self.config
        x, edge_attr = self._scaled(data)
        stats = (
            neuron_statistics(data, x, edge_attr) if config.neuron_statistics else None
        )
        if config.layer_normalised_edges:
            rms = layer_rms(data, edge_attr)
            edge_attr = edge_attr / torch.where(rms > 1e-12, rms, 1.0)[:, None]
        if self.fourier is not None:
            x, edge_attr = self.fourier(x), self.fourier(edge_attr)
        nodes = [x, F.one_hot(data.node_role, len(NODE_ROLES)).to(x.dtype)]
        edges = [edge_attr]
        if config.layer_embedding:
            nodes.append(self.node_layer_embedding(data.node_type))
            edges.append(self.edge_layer_embedding(data.edge_type))
        if config.activation_embedding:
            nodes.append(self.activation_embedding(data.node_act))
        if config.positional:
            row, has = self.positions(data)
            nodes.append(self.position_embedding(row) * has[:, None].to(x.dtype))
        if config.probes:
            if networks is None:
                raise ValueError(
                    "the config has probes: pass the networks (their "
                    "architectures) to run them through"
                )
            probes = probe_activations(networks, data, self.probe_inputs)
            nodes.append(probes.to(x.dtype))
        if stats is not None:
            if len(self.stat_knots):
                stats = quantile_scale(stats, self.stat_knots)
            elif len(self.stat_scale):
                stats = (stats - self.stat_shift) / self.stat_scale
                if config.input_clip is not None:
                    stats = stats.clamp(-config.input_clip, config.input_clip)
            nodes.append(stats.to(x.dtype))
        return torch.cat(nodes, dim=1), torch.cat(edges, dim=1)

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}(edge_features={self.edge_features}, "
            f"node_in={self.node_in}, edge_in={self.edge_in}, {self.config})"
        )
