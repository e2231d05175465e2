"""From a module (or a module and a state_dict) to a neural graph in one call.

:func:`to_graph` reads the structure from ``torch.fx`` (exact connectivity,
:mod:`lopt.weightspace.graph.trace`) and falls back, with a ``UserWarning`` saying
why, to the optimizer's shape inference (:class:`lopt.graph.NeuralGraph`)
when tracing fails or meets something it cannot represent.

How weights become features (the paper's conventions, Kofinas et al. 2024):

* node features ``x``: a neuron's bias; for a normalisation neuron its shift
  and, for batch norm, its running mean and variance (:data:`NODE_FEATURES`);
* edge features: one edge per (input neuron, output neuron) pair; a conv edge
  carries its whole kernel, zero-padded (centred) to a shared ``kernel_size``
  and flattened, so networks of different kernel sizes share one feature
  width; a linear weight is a 1x1 kernel (the centre tap);
* normalisation layers are neurons of their own joined one-to-one to their
  inputs (the scale on the edge): a neuron then has one bias whatever layers
  follow it, ``conv -> relu -> bn`` and ``conv -> bn -> relu`` are different
  graphs (as they are different functions), and the edit of a scale is an edge
  output like any weight's;
* integer buffers (``num_batches_tracked``) are counters, not weights: they are
  not in the graph.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from lopt.graph import STANDALONE_SLOT, NeuralGraph
from lopt.tracing import NORMS
from lopt.weightspace.graph.builder import GraphBuilder, Unsupported
from lopt.weightspace.graph.data import NeuralGraphData
from lopt.weightspace.graph.trace import add_norm_layer, guess_spatial_shape
from lopt.weightspace.graph.trace import trace_into as _trace_into

__all__ = ["to_graph", "graph_state"]


def graph_state(
    module: nn.Module, state_dict: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """The floating-point entries of ``state_dict`` (default: the module's),
    in the module's state_dict order, after checking that its keys and shapes
    are the module's.

    Raises:
        ValueError: keys missing or unexpected, or shapes that differ.
    """
    reference = module.state_dict()
    if state_dict is None:
        state_dict = reference
    missing = [k for k in reference if k not in state_dict]
    unexpected = [k for k in state_dict if k not in reference]
    if missing or unexpected:
        raise ValueError(
            f"state_dict does not match {type(module).__name__}: "
            f"missing keys {missing[:5]}, unexpected keys {unexpected[:5]}"
        )
    for key, ref in reference.items():
        if tuple(state_dict[key].shape) != tuple(ref.shape):
            raise ValueError(
                f"state_dict entry {key!r} has shape {tuple(state_dict[key].shape)}, "
                f"the module's has {tuple(ref.shape)}"
            )
    return {
        k: state_dict[k].detach()
        for k in reference
        if state_dict[k].is_floating_point()
    }


def build_graph(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor | None = None,
    trace: bool = True,
) -> tuple[GraphBuilder, torch.Tensor | None]:
    """The unfinished graph of :func:`to_graph` and its output neurons (a
    dataset finishes many of them with one shared kernel size)."""
    state = graph_state(module, state_dict)
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if trace:
        builder = GraphBuilder(state)
        try:
            outputs = _trace_into(module, builder, example_inputs)
            builder.place_rest()
            return builder, outputs
        except Unsupported as err:
            reason = str(err)
        warnings.warn(
            f"to_graph: {type(module).__name__} falls back to shape inference "
            f"over its parameters, because {reason}. Residual connections and "
            "activations are not represented in this graph.",
            UserWarning,
            stacklevel=3,
        )
    builder = GraphBuilder(state)
    outputs = _infer_into(module, builder)
    builder.place_rest()
    return builder, outputs


def to_graph(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    *,
    kernel_size: Sequence[int] | None = None,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor | None = None,
    trace: bool = True,
) -> NeuralGraphData:
    """The neural graph of a network: neurons are nodes, connections are edges.

    Args:
        module: the network (its architecture; its weights unless
            ``state_dict`` is given).
        state_dict: weights for ``module`` (same keys and shapes).
        kernel_size: pad every edge's kernel to this shape, e.g. ``(5, 5)``;
            graphs batched together need the same one (default: the smallest
            shape this network's kernels and flattened feature maps fit in).
        example_inputs: inputs to run shape propagation with, so that the
            spatial shape of a flattened feature map is known exactly
            (otherwise it is taken to be square, or a row).
        trace: use ``torch.fx``; ``False`` goes straight to shape inference.

    Returns:
        A :class:`~lopt.weightspace.graph.data.NeuralGraphData` (see its shapes).

    Raises:
        ValueError: a ``state_dict`` that does not fit the module, or a
            ``kernel_size`` smaller than the network's kernels.
    """
    builder, outputs = build_graph(module, state_dict, example_inputs, trace)
    return builder.finish(outputs, tuple(kernel_size) if kernel_size else None)


def _infer_into(module: nn.Module, b: GraphBuilder) -> torch.Tensor | None:
    """Describe the state to ``b`` by the optimizer's shape inference: the
    connectivity of each weight tensor is read off ``NeuralGraph``'s edges;
    1-D tensors of normalisation modules become norm neurons (as when
    tracing), a layer's ``bias`` its neurons' bias, anything else standalone."""
    names = list(b.state)
    shapes = [b.state[n].shape for n in names]
    ng = NeuralGraph.from_shapes(shapes)
    start, offset = {}, 0
    for t in ng.tensor_order:
        start[t] = offset
        offset += shapes[t].numel()
    num_edges = ng.num_edges
    mine = torch.full((ng.num_nodes,), -1, dtype=torch.long)  # ng id -> ours
    resolve = torch.zeros(0, dtype=torch.long)  # ours -> ours after norms
    norms: dict[str, torch.Tensor] = {}
    current, conv_dims = None, 0

    def grow() -> torch.Tensor:
        n = b.num_nodes - len(resolve)
        return torch.cat([resolve, torch.arange(len(resolve), len(resolve) + n)])

    for t, name in enumerate(names):
        shape, first = shapes[t], start[t]
        prefix, _, suffix = name.rpartition(".")
        if len(shape) >= 2 and shape.numel() > 0:
            out, inn, kernel = shape[0], shape[1], tuple(shape[2:])
            k = math.prod(kernel)
            src_ng = ng.edge_index[0, first : first + inn * k : k]
            channels = torch.unique_consecutive(src_ng)
            size = inn // len(channels)
            if kernel and size > 1:  # a conv reading a "flatten": no meaning
                inputs, size = b.add_nodes(inn, "input", "input", 0), 1
            else:
                new = mine[channels] < 0  # NeuralGraph's fresh input nodes
                if new.any():
                    mine[channels[new]] = b.add_nodes(
                        int(new.sum()), "input", "input", 0
                    )
                inputs = mine[channels]
            resolve = grow()
            inputs = resolve[inputs]
            if kernel:
                layer_type, kernels, conv_dims = "conv", b.state[name], len(kernel)
                kernels = kernels.reshape(out * inn, *kernel)
            elif size == 1:
                layer_type, kernels = "linear", b.state[name].reshape(-1)
            else:
                layer_type = "flatten_linear"
                spatial = guess_spatial_shape(size, conv_dims)
                kernels = b.state[name].reshape(out * len(inputs), *spatial)
            outputs = b.add_nodes(out, "hidden", layer_type, b.layer_of(inputs) + 1)
            mine[ng.edge_index[1, first : first + out * inn * k : inn * k]] = outputs
            b.add_edges(
                inputs.repeat(out),
                outputs.repeat_interleave(len(inputs)),
                kernels,
                layer_type,
                name,
            )
            current = outputs
            continue
        slot = first - num_edges
        is_slot = len(shape) == 1 and int(ng.slot_type[slot]) != STANDALONE_SLOT
        owner = _submodule(module, prefix)
        if is_slot and isinstance(owner, NORMS):
            if prefix not in norms:
                nodes = mine[ng.slot_node[slot : slot + shape[0]].long()]
                resolve = grow()
                inputs = resolve[nodes]
                norms[prefix] = add_norm_layer(b, prefix, inputs)
                resolve = grow()
                lookup = torch.arange(len(resolve))
                lookup[inputs] = norms[prefix]
                resolve = lookup[resolve]
                current = norms[prefix]
        elif is_slot and suffix == "bias" and int(ng.slot_type[slot]) == 0:
            nodes = mine[ng.slot_node[slot : slot + shape[0]].long()]
            b.place_on_nodes(name, nodes, "bias")
        # Anything else stays unplaced: finish() makes it standalone nodes.
    b.set_activation(torch.arange(b.num_nodes), "unknown")
    return current


def _submodule(module: nn.Module, prefix: str) -> nn.Module | None:
    try:
        return module.get_submodule(prefix)
    except AttributeError:
        return None
