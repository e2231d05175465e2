"""Hidden-neuron permutations of a network's state_dict: the symmetry the
weight-space models respect, used for augmentation and for tests."""

from __future__ import annotations

import weakref

import torch
from torch import nn

__all__ = ["chain_layers", "execution_order", "permute_hidden"]


#: Each traced architecture's key order (networks of a zoo share modules).
_ORDER: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def execution_order(module: nn.Module) -> list[str] | None:
    """``module``'s state_dict keys in the order its forward uses them, from
    its ``torch.fx`` trace (each called module's entries, in call order), or
    ``None`` when fx cannot trace it. Keys the trace never touches keep their
    registration order, after the others."""
    if module in _ORDER:
        return _ORDER[module]
    try:
        graph = torch.fx.symbolic_trace(module).graph
    except Exception:  # noqa: BLE001  (fx raises many types; any means "untraceable")
        _ORDER[module] = None
        return None
    keys = list(module.state_dict())
    used: dict[str, None] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            inner = module.get_submodule(node.target).state_dict()
            used.update({f"{node.target}.{k}": None for k in inner})
        elif node.op == "get_attr":
            used[node.target] = None
    known = set(keys)
    order = [k for k in used if k in known]
    order += [k for k in keys if k not in used]
    _ORDER[module] = order
    return order


def chain_layers(
    state: dict[str, torch.Tensor], module: nn.Module | None = None
) -> list[dict[str, str]]:
    """Group a state_dict into layers: each tensor of two or more dims starts
    a layer (``"weight"``); one-dim tensors of the same module are its
    ``"bias"``, those of the next module (a norm) its ``"norm_weight"`` /
    ``"norm_bias"`` / ``"norm_running_mean"`` / ``"norm_running_var"``.
    Shortcut weights (keys containing ``shortcut``) form layers marked
    ``{"shortcut": key}``.

    "Next" is in the order ``module``'s traced forward runs its modules
    (:func:`execution_order`) when ``module`` is given and fx traces it, so
    norms registered apart from their layers (a separate ``ModuleList``)
    join the layer whose output they normalise; otherwise it is the
    state_dict's (registration) order.
    """
    order = execution_order(module) if module is not None else None
    if order is not None:
        state = {k: state[k] for k in order if k in state}
    layers: list[dict[str, str]] = []
    for key, value in state.items():
        prefix, _, leaf = key.rpartition(".")
        if "shortcut" in key:
            layers.append({"shortcut": key})
        elif value.dim() >= 2:
            layers.append({"weight": key, "prefix": prefix})
        elif layers and "weight" in layers[-1]:
            slot = leaf if prefix == layers[-1]["prefix"] else f"norm_{leaf}"
            layers[-1][slot] = key
        else:
            raise ValueError(f"{key} does not follow a weight tensor")
    return layers


def permute_hidden(
    state: dict[str, torch.Tensor], generator: torch.Generator | None = None
) -> dict[str, torch.Tensor]:
    """The same function with its hidden neurons randomly permuted.

    For chains of linear / conv layers (each layer's inputs are the previous
    layer's outputs, or their flattened spatial maps): every layer but the
    last gets a random permutation of its output neurons (channels), applied
    to its weight rows, bias, norm parameters and the next layer's weight
    columns.

    Raises:
        ValueError: a network with shortcut connections, or layers that do
            not chain.
    """
    layers = chain_layers(state)
    if any("shortcut" in layer for layer in layers):
        raise ValueError("permute_hidden handles chains only, not shortcuts")
    out = dict(state)
    for i, layer in enumerate(layers[:-1]):
        width = state[layer["weight"]].shape[0]
        perm = torch.randperm(width, generator=generator)
        for slot, key in layer.items():
            if slot != "prefix":
                out[key] = out[key][perm]
        nxt = out[layers[i + 1]["weight"]]
        fan_in = nxt.shape[1]
        if fan_in % width:
            raise ValueError(
                f"layer {i + 1} takes {fan_in} inputs from {width} neurons"
            )
        block = fan_in // width
        cols = (perm[:, None] * block + torch.arange(block)).reshape(-1)
        out[layers[i + 1]["weight"]] = nxt[:, cols]
    return out
