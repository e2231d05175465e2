"""Probe features: every neuron's activation on a set of probe inputs.

Weights alone say what a network is; its activations on a few inputs say what
it computes. Kofinas et al. (2024) feed each neuron's activations on learned
probe inputs to the model as node features (their largest gain on INRs).

How the forward is rebuilt. A :class:`~lopt.weightspace.NeuralGraphData`
carries the weights (``from_graph_outputs`` returns the state_dict exactly)
and, from the ``torch.fx`` trace that built it, where each neuron's value
lives: ``fx_values`` names the traced nodes whose outputs hold neuron values
along dim 1, ``node_fx (N,)`` picks one per neuron (the last that holds it:
after its activation, norm or residual sum) and ``node_channel (N,)`` its
channel there (``-1`` for both where none, e.g. standalone scalars). The
architecture is the caller's module, traced again (the same module gives the
same trace) with those nodes as extra outputs, and run with
:func:`torch.func.functional_call` on the graph's weights. Conv activations are
averaged over positions (the paper's per-channel mean). Networks that share
one architecture run together under :func:`torch.func.vmap`.

Everything is differentiable in the probes, so a model can learn them. A
hidden neuron's activations move with it when hidden neurons are permuted, so
a model that takes them stays equivariant.

Graphs built by shape inference (no trace) have no value map and cannot be
probed. The module runs in its current mode: put it in ``eval()``.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence

import torch
from torch import fx, nn
from torch.func import functional_call, vmap

from lopt.weightspace.graph.data import from_graph_outputs

__all__ = ["probe_activations"]

# module -> {fx value names -> its trace returning those values}
_TRACES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _value_module(module: nn.Module, names: tuple[str, ...]) -> fx.GraphModule:
    traces = _TRACES.setdefault(module, {})
    if names not in traces:
        gm = fx.symbolic_trace(module)
        nodes = {node.name: node for node in gm.graph.nodes}
        missing = [name for name in names if name not in nodes]
        if missing:
            raise ValueError(
                f"{type(module).__name__} does not trace to the graph's network: "
                f"no traced values {missing[:3]} (pass the architecture the graph "
                "was built from)"
            )
        (output,) = (node for node in gm.graph.nodes if node.op == "output")
        gm.graph.erase_node(output)
        gm.graph.output(tuple(nodes[name] for name in names))
        gm.recompile()
        traces[names] = gm
    return traces[names]


def _check_fits(module: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """The graph's weights are the module's floating-point state_dict entries
    (integer counters are not in graphs), with the same shapes."""
    expected = {
        k: tuple(v.shape)
        for k, v in module.state_dict().items()
        if v.is_floating_point()
    }
    given = {k: tuple(v.shape) for k, v in state.items()}
    if given != expected:
        wrong = sorted(
            k for k in expected.keys() | given.keys() if expected.get(k) != given.get(k)
        )
        raise ValueError(
            f"{type(module).__name__} does not trace to the graph's network: "
            f"weights {wrong[:3]} differ in name or shape (pass the architecture "
            "the graph was built from)"
        )


def _names(data) -> tuple[str, ...]:
    names = tuple(data.fx_values)
    if not names:
        raise ValueError(
            "the graph has no traced values (it was built by shape inference): "
            "probes need a module that torch.fx traces"
        )
    return names


def _channel_table(
    values: tuple[torch.Tensor, ...],
    node_fx: torch.Tensor,
    node_channel: torch.Tensor,
    batched: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each value's channels (dim 1 of one network's output) averaged over
    positions and concatenated, ``([B,] P, sum C)``, and each node's column
    in it (``0`` for nodes without a value, which callers mask)."""
    first = 2 + batched  # ([B,] P, C, positions...)
    means = [v.flatten(first).mean(first) if v.dim() > first else v for v in values]
    widths = torch.tensor([m.shape[-1] for m in means], device=node_fx.device)
    offsets = torch.cumsum(widths, 0) - widths
    columns = offsets[node_fx.clamp(min=0)] + node_channel.clamp(min=0)
    return torch.cat(means, dim=-1), columns


def _single(module: nn.Module, data, probes: torch.Tensor, state) -> torch.Tensor:
    _check_fits(module, state)
    gm = _value_module(module, _names(data))
    known = set(gm.state_dict())
    state = {k: v for k, v in state.items() if k in known}
    values = functional_call(gm, state, (probes,))
    table, columns = _channel_table(values, data.node_fx, data.node_channel, False)
    has = (data.node_fx >= 0)[:, None].to(table.dtype)
    return table[:, columns].T * has


def probe_activations(
    networks: nn.Module | Sequence[nn.Module],
    data,
    probes: torch.Tensor,
    state_dicts: Mapping[str, torch.Tensor]
    | Sequence[Mapping[str, torch.Tensor]]
    | None = None,
) -> torch.Tensor:
    r"""Each neuron's activation on each probe input, in the graph's node order.

    Args:
        networks: the architecture of the graphs: one module for a graph, or
            for a batch whose networks all share it (run under ``vmap``); or
            one module per graph of the batch. Their own weights are not used.
        data: a graph from :func:`~lopt.weightspace.to_graph` or a batch.
        probes: ``(P, *input_shape)`` network inputs.
        state_dicts: the weights (default: the graph's own, through
            :func:`~lopt.weightspace.from_graph_outputs`); one per graph.

    Returns:
        ``(N, P)``: row ``n`` holds neuron ``n``'s activations (a channel's
        mean over positions); zero for nodes without one.

    Raises:
        ValueError: a graph without a value map, a module that does not trace
            to the graph's network, or one module for graphs of different
            architectures.

    Shapes:
        - **input:** ``probes (P, *input_shape)``
        - **output:** ``(N, P)``
    """
    if probes.dim() < 2:
        raise ValueError(f"probes must be (P, *input_shape), got {tuple(probes.shape)}")
    if not hasattr(data, "node_fx"):
        raise ValueError("the graph has no value map: build it with to_graph")
    batched = hasattr(data, "num_graphs") and hasattr(data, "ptr")
    if not batched:
        module = networks if isinstance(networks, nn.Module) else networks[0]
        state = from_graph_outputs(data) if state_dicts is None else state_dicts
        return _single(module, data, probes, state)
    states = from_graph_outputs(data) if state_dicts is None else list(state_dicts)
    if len(states) != data.num_graphs:
        raise ValueError(f"got {len(states)} state_dicts for {data.num_graphs} graphs")
    if not isinstance(networks, nn.Module):
        networks = list(networks)
        if len(networks) != data.num_graphs:
            raise ValueError(
                f"got {len(networks)} networks for {data.num_graphs} graphs"
            )
        return torch.cat(
            [
                _single(net, data.get_example(i), probes, states[i])
                for i, net in enumerate(networks)
            ]
        )
    names = _names(data.get_example(0))
    if any(tuple(n) != names for n in data.fx_values):
        raise ValueError(
            "one module for graphs of different architectures: pass one per graph"
        )
    for state in states:
        _check_fits(networks, state)
    gm = _value_module(networks, names)
    known = set(gm.state_dict())
    stacked = {k: torch.stack([s[k] for s in states]) for k in states[0] if k in known}
    values = vmap(lambda s: functional_call(gm, s, (probes,)))(stacked)
    table, columns = _channel_table(values, data.node_fx, data.node_channel, True)
    has = (data.node_fx >= 0)[:, None].to(table.dtype)
    return table[data.batch, :, columns] * has
