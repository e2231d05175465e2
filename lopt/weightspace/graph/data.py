"""The weight-space neural graph as PyTorch Geometric data, and the map from
per-node and per-edge values back to a state_dict.

A network becomes a :class:`NeuralGraphData` (built by
:func:`lopt.weightspace.to_graph`): nodes are neurons, edges are connections,
and every floating-point entry of the network's state_dict sits in exactly one
place of the node features ``x`` or the edge features ``edge_attr``. The
*parameter map* (``param_node_pos``, ``param_edge_pos`` and ``param_layout``)
records those places, so that any tensor shaped like ``x`` / ``edge_attr`` (the
features themselves, or a model's per-node and per-edge predictions) maps back
to tensors of the state_dict's shapes: :func:`from_graph_outputs` and
:func:`apply_graph_delta`.

Unlike the optimizer's :class:`lopt.graph.NeuralGraph` (channel-major, one
edge per scalar weight, built for speed on millions of weights), these graphs
are node-major in PyG's conventions (``edge_attr (E, F_edge)``): they are small
(a zoo holds thousands of networks of a few thousand weights each) and are
batched by :class:`torch_geometric.loader.DataLoader`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch_geometric.data import Batch, Data

__all__ = [
    "NeuralGraphData",
    "ParamSpec",
    "NODE_ROLES",
    "LAYER_TYPES",
    "ACTIVATIONS",
    "NODE_FEATURES",
    "from_graph_outputs",
    "apply_graph_delta",
]

#: ``node_role`` values. Input and output neurons keep their order in
#: ``node_pos``; hidden neurons (and standalone scalars) have ``node_pos == -1``.
NODE_ROLES = ("input", "hidden", "output", "standalone")
#: ``node_type`` (the layer that created a node) and ``edge_type`` values.
#: ``flatten_linear`` is a linear layer after a flatten (its edges carry the
#: spatial map of weights of one channel); ``norm`` is a normalisation layer
#: (one-to-one edges carry its scale); ``residual`` edges are identities (and a
#: ``residual`` node is the sum of two branches when neither can hold it).
LAYER_TYPES = (
    "input",
    "linear",
    "conv",
    "flatten_linear",
    "norm",
    "residual",
    "standalone",
)
#: ``node_act``: the nonlinearity applied to a neuron's output. ``unknown`` is
#: what graphs from shape inference (no tracing) record.
ACTIVATIONS = (
    "none",
    "relu",
    "leaky_relu",
    "gelu",
    "silu",
    "elu",
    "softplus",
    "tanh",
    "sigmoid",
    "sin",
    "unknown",
)
#: Columns of ``x``: a neuron's bias (a norm layer's shift for norm neurons),
#: and a batch norm's running mean and variance (zero elsewhere).
NODE_FEATURES = ("bias", "running_mean", "running_var")


class ParamSpec(NamedTuple):
    """Where one state_dict tensor lives in the graph."""

    name: str  # state_dict key
    shape: tuple[int, ...]
    dtype: str  # e.g. "float32", restored by from_graph_outputs
    kind: str  # "node" (entries of x) or "edge" (entries of edge_attr)


class NeuralGraphData(Data):
    """A neural graph in PyG's :class:`~torch_geometric.data.Data` conventions.

    Shapes (``N`` nodes, ``E`` edges, ``P_n`` / ``P_e`` state_dict entries held
    by nodes / edges):
        - ``x``: ``(N, len(NODE_FEATURES))`` float node features.
        - ``edge_index``: ``(2, E)`` int64, rows ``(src, dst)``.
        - ``edge_attr``: ``(E, F_edge)`` float, ``F_edge = prod(kernel_shape)``:
          each edge's kernel, zero-padded (centred) to ``kernel_shape`` and
          flattened; a linear weight is a 1x...x1 kernel, so it sits at the
          centre tap.
        - ``node_role``, ``node_type``, ``node_act``, ``node_layer``,
          ``node_pos``: ``(N,)`` int64 (:data:`NODE_ROLES`,
          :data:`LAYER_TYPES`, :data:`ACTIVATIONS`, depth, input/output
          position or -1).
        - ``edge_type``: ``(E,)`` int64 (:data:`LAYER_TYPES`); ``edge_tensor``:
          ``(E,)`` int64, the index in ``param_layout`` of the tensor that
          holds the edge's weights, or -1 for parameter-free (identity) edges.
        - ``param_node_pos``: ``(P_n,)`` int64 positions in ``x.reshape(-1)``;
          ``param_edge_pos``: ``(P_e,)`` int64 positions in
          ``edge_attr.reshape(-1)``. The entries of the ``kind == "node"``
          tensors of ``param_layout``, flattened and concatenated in layout
          order, are ``x.reshape(-1)[param_node_pos]`` (likewise for edges).
        - ``param_layout``: tuple of :class:`ParamSpec` (not a tensor; a batch
          holds a list of them, one per graph).
        - ``kernel_shape``: tuple of ints (not a tensor).
        - ``node_fx``, ``node_channel``: ``(N,)`` int64: where each neuron's
          final value is in the module's ``torch.fx`` trace, as an index into
          ``fx_values`` (tuple of traced node names, not a tensor) and a
          channel (dim 1) of that node's output; ``-1`` where none (graphs
          from shape inference have none). Read by
          :func:`~lopt.weightspace.probe_activations`.
        - ``y``: optional graph label, ``(1, ...)`` so that a batch is ``(B, ...)``.

    In a batch, ``param_node_pos`` and ``param_edge_pos`` point into the
    batch's ``x`` and ``edge_attr``: :meth:`__inc__` shifts them by the size of
    the graphs before. They are concatenated along dim 0 like node-level keys,
    so the default :meth:`__cat_dim__` is right for them; ``node_pos`` and
    ``node_layer`` are values, not node ids, so they are not shifted (PyG
    shifts only keys whose name contains ``index``).
    """

    def __inc__(self, key: str, value, *args, **kwargs):
        if key == "param_node_pos":
            return self.x.numel()
        if key == "param_edge_pos":
            return self.edge_attr.numel()
        return super().__inc__(key, value, *args, **kwargs)


def _graphs(data: NeuralGraphData | Batch) -> list[tuple[ParamSpec, ...]]:
    if isinstance(data, Batch):
        return list(data.param_layout)
    return [data.param_layout]


def _check_values(data, node_values, edge_values):
    if node_values is None:
        node_values = data.x
    if edge_values is None:
        edge_values = data.edge_attr
    for label, values, ref in (
        ("node_values", node_values, data.x),
        ("edge_values", edge_values, data.edge_attr),
    ):
        if tuple(values.shape) != tuple(ref.shape):
            name = "x" if label == "node_values" else "edge_attr"
            raise ValueError(
                f"{label} must have the shape of data.{name}, "
                f"{tuple(ref.shape)}, got {tuple(values.shape)}"
            )
    return node_values, edge_values


def from_graph_outputs(
    data: NeuralGraphData | Batch,
    node_values: torch.Tensor | None = None,
    edge_values: torch.Tensor | None = None,
) -> dict[str, torch.Tensor] | list[dict[str, torch.Tensor]]:
    """Turn per-node and per-edge values into state_dict tensors.

    ``from_graph_outputs(data)`` (the graph's own features) gives back every
    floating-point tensor of the network's state_dict exactly; a model's
    predictions shaped like the features give one tensor per state_dict entry
    (for editing: a delta per weight, per bias, per norm parameter). Values at
    places that hold no parameter (kernel padding, identity edges) are ignored.

    Args:
        data: a graph from :func:`~lopt.weightspace.to_graph`, or a batch.
        node_values: ``(N, F_node)``, shaped like ``data.x`` (default: ``x``).
        edge_values: ``(E, F_edge)``, shaped like ``data.edge_attr``
            (default: ``edge_attr``).

    Returns:
        ``{name: tensor}`` in state_dict order with the original shapes and
        dtypes (integer buffers such as ``num_batches_tracked`` are not in the
        graph and not returned); a list of them for a batch.
    """
    node_values, edge_values = _check_values(data, node_values, edge_values)
    node_flat = node_values.reshape(-1)[data.param_node_pos]
    edge_flat = edge_values.reshape(-1)[data.param_edge_pos]
    offsets = {"node": 0, "edge": 0}
    streams = {"node": node_flat, "edge": edge_flat}
    out = []
    for layout in _graphs(data):
        tensors = {}
        for spec in layout:
            numel = torch.Size(spec.shape).numel()
            start = offsets[spec.kind]
            flat = streams[spec.kind][start : start + numel]
            offsets[spec.kind] = start + numel
            tensors[spec.name] = flat.reshape(spec.shape).to(getattr(torch, spec.dtype))
        out.append(tensors)
    return out if isinstance(data, Batch) else out[0]


def apply_graph_delta(
    state_dict: dict[str, torch.Tensor],
    data: NeuralGraphData,
    node_delta: torch.Tensor | None = None,
    edge_delta: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """``state_dict`` plus per-node and per-edge deltas mapped back through
    ``data``'s parameter map (:func:`from_graph_outputs`); entries the graph
    does not hold (integer buffers) are copied unchanged.

    Args:
        state_dict: the network the graph ``data`` was built from.
        data: a single graph (not a batch).
        node_delta: ``(N, F_node)`` or ``None`` (zero).
        edge_delta: ``(E, F_edge)`` or ``None`` (zero).
    """
    if isinstance(data, Batch):
        raise ValueError("apply_graph_delta takes one graph, not a batch")
    if node_delta is None:
        node_delta = torch.zeros_like(data.x)
    if edge_delta is None:
        edge_delta = torch.zeros_like(data.edge_attr)
    deltas = from_graph_outputs(data, node_delta, edge_delta)
    missing = sorted(set(deltas) - set(state_dict))
    if missing:
        raise ValueError(f"state_dict lacks entries the graph holds: {missing[:5]}")
    return {
        name: value + deltas[name].to(value.device) if name in deltas else value
        for name, value in state_dict.items()
    }
