"""Walking a module's ``torch.fx`` trace, following which neurons each tensor holds.

Both halves of lopt read a network's exact connectivity from its trace: the
optimizer's :meth:`lopt.graph.NeuralGraph.from_module` and the weight-space
:func:`lopt.weightspace.to_graph`. They differ in what a layer, a norm or a
residual sum becomes (edges and node slots over the parameters, or a graph of
weights as features), not in how the trace is read. :class:`FxWalker` reads
it and asks its subclass to build:

* ``nn.Linear`` / ``nn.ConvNd`` (``groups=1``) create a layer of neurons
  (:meth:`FxWalker.layer`);
* a linear layer after a flatten reads the flattened channels: each input
  feature belongs to one channel (``kernel`` is the channel's spatial map);
* normalisation layers (batch, instance, layer and single-group group norms)
  act on the neurons they normalise (:meth:`FxWalker.norm`);
* a residual sum of two tensors of neurons (:meth:`FxWalker.residual`);
* activations are reported on the neurons they act on
  (:meth:`FxWalker.activation`); pooling, dropout and scalings by a constant
  pass neurons through unchanged;
* ``torch.cat`` along channels joins the neurons of its inputs.

Anything else that touches the network's tensors (attention, recurrent
layers, products of tensors, parameters used as tensors) raises
:class:`Unsupported`, and the caller falls back to shape inference.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import fx, nn

__all__ = [
    "FxWalker",
    "NORMS",
    "TracedValue",
    "Unsupported",
    "guess_spatial_shape",
    "trace_module",
]


class Unsupported(Exception):
    """The structure met cannot be represented exactly; the caller falls back."""


_ACT_MODULES = {
    nn.ReLU: "relu",
    nn.ReLU6: "relu",
    nn.LeakyReLU: "leaky_relu",
    nn.GELU: "gelu",
    nn.SiLU: "silu",
    nn.ELU: "elu",
    nn.Softplus: "softplus",
    nn.Tanh: "tanh",
    nn.Sigmoid: "sigmoid",
}
_ACT_FUNCTIONS = {
    torch.relu: "relu",
    F.relu: "relu",
    F.leaky_relu: "leaky_relu",
    F.gelu: "gelu",
    F.silu: "silu",
    F.elu: "elu",
    F.softplus: "softplus",
    torch.tanh: "tanh",
    F.tanh: "tanh",
    torch.sigmoid: "sigmoid",
    F.sigmoid: "sigmoid",
    torch.sin: "sin",
}
_ACT_METHODS = {"relu": "relu", "tanh": "tanh", "sigmoid": "sigmoid", "sin": "sin"}
_PASS_MODULES = (
    nn.Identity,
    nn.modules.dropout._DropoutNd,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.Softmax,
    nn.LogSoftmax,
)
_PASS_FUNCTIONS = {
    F.dropout,
    F.max_pool1d,
    F.max_pool2d,
    F.max_pool3d,
    F.avg_pool1d,
    F.avg_pool2d,
    F.avg_pool3d,
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d,
    F.adaptive_max_pool2d,
    F.adaptive_max_pool3d,
    F.softmax,
    F.log_softmax,
}
_PASS_METHODS = {"contiguous", "float", "clone", "detach"}
_SCALE_TARGETS = {operator.mul, operator.truediv, torch.mul, "mul", "div"}
_ADD_TARGETS = {operator.add, operator.iadd, torch.add, "add"}
_FLATTEN_TARGETS = {torch.flatten, "flatten", "view", "reshape"}
_SHAPE_QUERIES = {getattr, "size", "dim"}
#: The normalisation layers a trace understands.
NORMS = (
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.LayerNorm,
    nn.GroupNorm,
)


@dataclass
class TracedValue:
    """The neurons a traced tensor holds."""

    nodes: torch.Tensor | None  # None: a network input not yet read by a layer
    flat: bool = False  # a flattened feature map (channel-major)
    spatial: tuple[int, ...] | None = None  # its spatial shape, when known
    conv_dims: int = 0  # spatial dims of the convolution that produced it


def guess_spatial_shape(size: int, conv_dims: int) -> tuple[int, ...]:
    """The spatial shape of a flattened map of ``size`` positions when no
    example input gave it: a cube of ``conv_dims`` equal sides when ``size``
    is one, otherwise one row."""
    if conv_dims >= 1:
        side = round(size ** (1.0 / conv_dims))
        if side**conv_dims == size:
            return (side,) * conv_dims
    return (size,)


def trace_module(
    module: nn.Module, example_inputs: tuple | None = None
) -> fx.GraphModule:
    """``module``'s symbolic trace, its tensor shapes propagated from
    ``example_inputs`` when given.

    Raises:
        Unsupported: ``torch.fx`` cannot trace the module.
        ValueError: ``example_inputs`` do not run through the module.
    """
    try:
        gm = fx.symbolic_trace(module)
    except Exception as err:  # noqa: BLE001 (tracing fails in many ways)
        raise Unsupported(
            f"torch.fx could not trace it ({type(err).__name__}: {err})"
        ) from err
    if example_inputs is not None:
        from torch.fx.passes.shape_prop import ShapeProp

        try:
            ShapeProp(gm).propagate(*example_inputs)
        except Exception as err:
            raise ValueError(
                f"example_inputs do not run through {type(module).__name__}: {err}"
            ) from err
    return gm


class FxWalker:
    """Walks a traced module once, in trace order, and asks its subclass to
    build what each layer, norm and residual sum becomes.

    Subclasses implement :meth:`new_inputs`, :meth:`layer`, :meth:`norm` and
    :meth:`residual`, and may override :meth:`activation` and
    :meth:`finish_values`.

    Args:
        gm: the traced module (:func:`trace_module`).
        shapes: the shape of each of the module's weights, by state_dict name
            (``"0.weight"``); a layer's bias is looked up the same way.
    """

    def __init__(self, gm: fx.GraphModule, shapes: Mapping[str, torch.Size]):
        self.gm, self.shapes = gm, shapes
        self.modules = dict(gm.named_modules())
        self.env: dict[fx.Node, TracedValue] = {}

    # ------------------------------------------------------------ the hooks
    def new_inputs(self, count: int) -> torch.Tensor:
        """``count`` new input neurons (a network input a layer reads)."""
        raise NotImplementedError

    def layer(
        self,
        name: str,
        inputs: torch.Tensor,
        out: int,
        kernel: tuple[int, ...],
        layer_type: str,
    ) -> torch.Tensor:
        """Layer ``name`` (weight ``f"{name}.weight"``, of ``out * len(inputs)
        * prod(kernel)`` scalars, row-major) from ``inputs`` to ``out`` new
        neurons, which it returns; ``layer_type`` is ``"linear"``, ``"conv"``
        or ``"flatten_linear"`` (then ``kernel`` is each channel's map)."""
        raise NotImplementedError

    def norm(self, name: str, inputs: torch.Tensor) -> torch.Tensor:
        """Normalisation layer ``name`` acting on ``inputs``; returns the
        neurons that hold its output."""
        raise NotImplementedError

    def residual(
        self, operands: list[fx.Node], nodes: list[torch.Tensor]
    ) -> TracedValue:
        """The sum of two tensors of as many neurons (``nodes``, of the traced
        ``operands``; never equal)."""
        raise NotImplementedError

    def activation(self, nodes: torch.Tensor, activation: str) -> None:
        """Nonlinearity ``activation`` acts on ``nodes`` (default: ignored)."""

    def finish_values(self) -> None:
        """Called once the walk reached the output (:attr:`env` complete)."""

    # ------------------------------------------------------------- the walk
    def run(self) -> torch.Tensor | None:
        """Walk the trace; returns the output neurons.

        Raises:
            Unsupported: the trace holds something that cannot be represented
                exactly.
        """
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                self.env[node] = TracedValue(None)
            elif node.op == "output":
                self.finish_values()
                return self._output(node)
            elif node.op == "get_attr":
                if any(user.op != "output" for user in node.users):
                    raise Unsupported(f"{node.target} is used directly as a tensor")
            elif node.op == "call_module":
                self._module(node, self.modules[node.target])
            else:
                self._function(node)
        return None

    def _values(self, node: fx.Node) -> list[fx.Node]:
        return [a for a in node.all_input_nodes if a in self.env]

    def _only_value(self, node: fx.Node) -> TracedValue:
        values = self._values(node)
        if len(values) != 1:
            raise Unsupported(f"{node.target} combines {len(values)} tensors")
        return self.env[values[0]]

    def _inputs(self, value: TracedValue, count: int) -> torch.Tensor:
        if value.nodes is None:
            value.nodes = self.new_inputs(count)
        return value.nodes

    def _output(self, node: fx.Node) -> torch.Tensor | None:
        out = node.args[0]
        if not isinstance(out, fx.Node):
            raise Unsupported("the module returns several tensors")
        if out not in self.env:
            raise Unsupported("the module's output is not a tensor of neurons")
        return self.env[out].nodes

    # ----------------------------------------------------------- modules
    def _module(self, node: fx.Node, module: nn.Module) -> None:
        name = node.target
        if isinstance(module, nn.Linear):
            self.env[node] = self._linear(node, name, module.in_features)
        elif isinstance(module, nn.modules.conv._ConvNd):
            if module.transposed or module.groups != 1:
                raise Unsupported(f"{name}: grouped or transposed convolution")
            self.env[node] = self._conv(node, name, module)
        elif isinstance(module, NORMS):
            self.env[node] = self._norm(node, name, module)
        elif type(module) in _ACT_MODULES:
            self._activation(node, _ACT_MODULES[type(module)])
        elif isinstance(module, _PASS_MODULES):
            self.env[node] = self._only_value(node)
        elif isinstance(module, nn.Flatten):
            if module.start_dim != 1:
                raise Unsupported(f"{name}: flatten from dim {module.start_dim}")
            self.env[node] = self._flatten(node)
        else:
            raise Unsupported(f"{name}: {type(module).__name__} is not supported")

    def _linear(self, node: fx.Node, name: str, in_features: int) -> TracedValue:
        value = self._only_value(node)
        inputs = self._inputs(value, in_features)
        out, channels = self.shapes[f"{name}.weight"][0], len(inputs)
        if in_features == channels:
            return TracedValue(self.layer(name, inputs, out, (), "linear"))
        if value.flat and in_features % channels == 0:
            size = in_features // channels
            spatial = value.spatial
            if spatial is None or math.prod(spatial) != size:
                spatial = guess_spatial_shape(size, value.conv_dims)
            nodes = self.layer(name, inputs, out, spatial, "flatten_linear")
            return TracedValue(nodes)
        raise Unsupported(f"{name}: {in_features} inputs after {channels} neurons")

    def _conv(self, node: fx.Node, name: str, conv: nn.Module) -> TracedValue:
        value = self._only_value(node)
        if value.flat:
            raise Unsupported(f"{name}: convolution of a flattened tensor")
        inputs = self._inputs(value, conv.in_channels)
        if len(inputs) != conv.in_channels:
            raise Unsupported(f"{name}: {conv.in_channels} channels in, {len(inputs)}")
        shape = self.shapes[f"{name}.weight"]
        nodes = self.layer(name, inputs, shape[0], tuple(shape[2:]), "conv")
        return TracedValue(nodes, conv_dims=len(shape) - 2)

    def _norm(self, node: fx.Node, name: str, norm: nn.Module) -> TracedValue:
        value = self._only_value(node)
        if isinstance(norm, nn.LayerNorm):
            if len(norm.normalized_shape) != 1 or (value.conv_dims and not value.flat):
                raise Unsupported(f"{name}: layer norm over more than the neurons")
            count = norm.normalized_shape[0]
        elif isinstance(norm, nn.GroupNorm):
            if norm.num_groups not in (1, norm.num_channels):
                # Groups tie channels together: a permutation must keep them.
                raise Unsupported(f"{name}: group norm with {norm.num_groups} groups")
            count = norm.num_channels
        else:
            count = norm.num_features
        inputs = self._inputs(value, count)
        if len(inputs) != count:
            raise Unsupported(f"{name}: {count} features, {len(inputs)} neurons")
        return replace(value, nodes=self.norm(name, inputs), flat=value.flat)

    # --------------------------------------------------------- functions
    def _function(self, node: fx.Node) -> None:
        target = node.target
        values = self._values(node)
        if not values or target in _SHAPE_QUERIES:
            return  # constants, or shape queries: no neurons
        if target in _ACT_FUNCTIONS:
            self._activation(node, _ACT_FUNCTIONS[target])
        elif isinstance(target, str) and target in _ACT_METHODS:
            self._activation(node, _ACT_METHODS[target])
        elif target in _PASS_FUNCTIONS or target in _PASS_METHODS:
            self.env[node] = self._only_value(node)
        elif target in _SCALE_TARGETS:
            if len(values) != 1 or not any(
                isinstance(a, numbers.Number) for a in node.args
            ):
                raise Unsupported(f"{target}: product of tensors")
            self.env[node] = self.env[values[0]]
        elif target in _ADD_TARGETS:
            self.env[node] = self._add(node, values)
        elif target in _FLATTEN_TARGETS:
            if target in (torch.flatten, "flatten"):
                start = (
                    node.args[1]
                    if len(node.args) > 1
                    else node.kwargs.get("start_dim", 0)
                )
                if start != 1:
                    raise Unsupported(f"flatten from dim {start}")
            self.env[node] = self._flatten(node)
        elif target in ("mean", torch.mean):
            dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            dims = (dims,) if isinstance(dims, int) else tuple(dims or ())
            if not dims or 1 in dims or 0 in dims:
                raise Unsupported("mean over the neurons")
            self.env[node] = self._only_value(node)
        elif target is torch.cat:
            self.env[node] = self._cat(node)
        else:
            raise Unsupported(f"{getattr(target, '__name__', target)} is not supported")

    def _activation(self, node: fx.Node, activation: str) -> None:
        value = self._only_value(node)
        if value.nodes is not None:
            self.activation(value.nodes, activation)
        self.env[node] = value

    def _flatten(self, node: fx.Node) -> TracedValue:
        value = self._only_value(node)
        if value.nodes is None or value.flat:
            return value  # flattening inputs: a layer reads them as they come
        source = self._values(node)[0]
        meta = source.meta.get("tensor_meta")
        spatial = tuple(meta.shape[2:]) if meta is not None else None
        return replace(value, flat=True, spatial=spatial)

    def _add(self, node: fx.Node, operands: list[fx.Node]) -> TracedValue:
        if len(operands) != 2:
            self.env[node] = self.env[operands[0]]  # plus a constant
            return self.env[node]
        a, b = (self.env[o] for o in operands)
        count = len(a.nodes) if a.nodes is not None else None
        if count is None and b.nodes is not None:
            count = len(b.nodes)
        if count is None:
            raise Unsupported("sum of two network inputs")
        nodes = [self._inputs(v, count) for v in (a, b)]
        if len(nodes[0]) != len(nodes[1]) or a.flat != b.flat:
            raise Unsupported("sum of tensors of different neurons")
        if torch.equal(nodes[0], nodes[1]):
            raise Unsupported("sum of a tensor with itself")
        return self.residual(operands, nodes)

    def _cat(self, node: fx.Node) -> TracedValue:
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        tensors = node.args[0]
        if dim != 1 or not all(t in self.env for t in tensors):
            raise Unsupported("concatenation along other dims than the channels")
        values = [self.env[t] for t in tensors]
        if any(v.nodes is None or v.flat for v in values):
            raise Unsupported("concatenation of inputs or flattened tensors")
        return TracedValue(
            torch.cat([v.nodes for v in values]),
            conv_dims=max(v.conv_dims for v in values),
        )
