"""Exact connectivity of a module from its ``torch.fx`` trace.

Walks the traced graph once, following which neurons each tensor holds:

* ``nn.Linear`` / ``nn.ConvNd`` (``groups=1``) create a layer of neurons, one
  edge per (input neuron, output neuron) carrying the kernel;
* a linear layer after a flatten gets one edge per (channel, output neuron)
  carrying that channel's spatial map of weights (a linear layer on a flattened
  feature map is a convolution whose kernel covers the whole map);
* normalisation layers (batch, instance, layer and single-group group norms)
  create a layer of neurons joined one-to-one to their inputs: the scale is the
  edge, the shift is the new neuron's bias, running statistics are node
  features;
* a residual sum adds identity edges (weight 1, the centre tap of an identity
  kernel) from the skip branch into the other branch's neurons;
* activations are recorded on the neurons they act on; pooling, dropout and
  scalings by a constant pass neurons through unchanged;
* ``torch.cat`` along channels joins the neurons of its inputs.

Anything else that touches the network's tensors raises
:class:`~lopt.weightspace.graph.builder.Unsupported`, and the caller falls back to
shape inference.
"""

from __future__ import annotations

import math
import numbers
import operator
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import fx, nn

from lopt.weightspace.graph.builder import GraphBuilder, Unsupported

__all__ = ["trace_into", "guess_spatial_shape"]

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
_NORMS = (
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.LayerNorm,
    nn.GroupNorm,
)


@dataclass
class _Value:
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


def trace_into(
    module: nn.Module,
    builder: GraphBuilder,
    example_inputs: tuple | None = None,
) -> torch.Tensor | None:
    """Describe ``module`` to ``builder`` from its fx trace; returns the
    output neurons.

    Raises:
        Unsupported: tracing fails, or the trace holds something that cannot
            be represented exactly (the caller falls back).
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
    return _Walker(gm, builder).run()


class _Walker:
    def __init__(self, gm: fx.GraphModule, builder: GraphBuilder):
        self.gm, self.b = gm, builder
        self.modules = dict(gm.named_modules())
        self.env: dict[fx.Node, _Value] = {}

    def run(self) -> torch.Tensor | None:
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                self.env[node] = _Value(None)
            elif node.op == "output":
                self._record_values()
                return self._output(node)
            elif node.op == "get_attr":
                if any(user.op != "output" for user in node.users):
                    raise Unsupported(f"{node.target} is used directly as a tensor")
            elif node.op == "call_module":
                self._module(node, self.modules[node.target])
            else:
                self._function(node)
        return None

    def _record_values(self) -> None:
        # After the walk: a network input gets its neurons when a layer first
        # reads it, after its own trace node was seen.
        for fx_node, value in self.env.items():
            if value.nodes is not None and not value.flat:
                self.b.record_value(fx_node.name, value.nodes)

    # ----------------------------------------------------------- helpers
    def _values(self, node: fx.Node) -> list[fx.Node]:
        return [a for a in node.all_input_nodes if a in self.env]

    def _only_value(self, node: fx.Node) -> _Value:
        values = self._values(node)
        if len(values) != 1:
            raise Unsupported(f"{node.target} combines {len(values)} tensors")
        return self.env[values[0]]

    def _inputs(self, value: _Value, count: int) -> torch.Tensor:
        if value.nodes is None:
            value.nodes = self.b.add_nodes(count, "input", "input", 0)
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
        elif isinstance(module, _NORMS):
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

    def _linear(self, node: fx.Node, name: str, in_features: int) -> _Value:
        value = self._only_value(node)
        inputs = self._inputs(value, in_features)
        weight = self.b.state[f"{name}.weight"]
        out, channels = weight.shape[0], len(inputs)
        if in_features == channels:
            kernels, layer_type = weight.reshape(out * channels), "linear"
        elif value.flat and in_features % channels == 0:
            size = in_features // channels
            spatial = value.spatial
            if spatial is None or math.prod(spatial) != size:
                spatial = guess_spatial_shape(size, value.conv_dims)
            kernels = weight.reshape(out * channels, *spatial)
            layer_type = "flatten_linear"
        else:
            raise Unsupported(f"{name}: {in_features} inputs after {channels} neurons")
        return self._layer(name, inputs, out, kernels, layer_type)

    def _conv(self, node: fx.Node, name: str, conv: nn.Module) -> _Value:
        value = self._only_value(node)
        if value.flat:
            raise Unsupported(f"{name}: convolution of a flattened tensor")
        inputs = self._inputs(value, conv.in_channels)
        if len(inputs) != conv.in_channels:
            raise Unsupported(f"{name}: {conv.in_channels} channels in, {len(inputs)}")
        weight = self.b.state[f"{name}.weight"]
        kernels = weight.reshape(weight.shape[0] * len(inputs), *weight.shape[2:])
        out = self._layer(name, inputs, weight.shape[0], kernels, "conv")
        return replace(out, conv_dims=weight.dim() - 2)

    def _layer(self, name, inputs, out, kernels, layer_type) -> _Value:
        layer = self.b.layer_of(inputs) + 1
        outputs = self.b.add_nodes(out, "hidden", layer_type, layer)
        src = inputs.repeat(out)
        dst = outputs.repeat_interleave(len(inputs))
        self.b.add_edges(src, dst, kernels, layer_type, f"{name}.weight")
        if f"{name}.bias" in self.b.state:
            self.b.place_on_nodes(f"{name}.bias", outputs, "bias")
        return _Value(outputs)

    def _norm(self, node: fx.Node, name: str, norm: nn.Module) -> _Value:
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
        return replace(
            value, nodes=add_norm_layer(self.b, name, inputs), flat=value.flat
        )

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
            self.b.set_activation(value.nodes, activation)
        self.env[node] = value

    def _flatten(self, node: fx.Node) -> _Value:
        value = self._only_value(node)
        if value.nodes is None or value.flat:
            return value  # flattening inputs: a layer reads them as they come
        source = self._values(node)[0]
        meta = source.meta.get("tensor_meta")
        spatial = tuple(meta.shape[2:]) if meta is not None else None
        return replace(value, flat=True, spatial=spatial)

    def _add(self, node: fx.Node, operands: list[fx.Node]) -> _Value:
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
        # The branch read by nothing else (the block's last layer) absorbs
        # the sum: identity edges into it, as in the paper's residual edges.
        candidates = [
            i
            for i, o in enumerate(operands)
            if len(o.users) == 1 and self.b.role_of(nodes[i]) == {"hidden"}
        ]
        if candidates:
            main = max(candidates, key=lambda i: int(nodes[i].max()))
            skip = 1 - main
            ones = torch.ones(count)
            self.b.add_edges(nodes[skip], nodes[main], ones, "residual")
            return (a, b)[main]
        layer = max(self.b.layer_of(n) for n in nodes) + 1
        out = self.b.add_nodes(count, "hidden", "residual", layer)
        for n in nodes:
            self.b.add_edges(n, out, torch.ones(count), "residual")
        return _Value(out, conv_dims=max(a.conv_dims, b.conv_dims))

    def _cat(self, node: fx.Node) -> _Value:
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        tensors = node.args[0]
        if dim != 1 or not all(t in self.env for t in tensors):
            raise Unsupported("concatenation along other dims than the channels")
        values = [self.env[t] for t in tensors]
        if any(v.nodes is None or v.flat for v in values):
            raise Unsupported("concatenation of inputs or flattened tensors")
        return _Value(
            torch.cat([v.nodes for v in values]),
            conv_dims=max(v.conv_dims for v in values),
        )


def add_norm_layer(builder: GraphBuilder, name: str, inputs: torch.Tensor):
    """A normalisation layer ``name`` on ``inputs``: new neurons joined
    one-to-one, the scale on the edges (1 without affine parameters), the
    shift and running statistics on the new neurons. Returns the new neurons."""
    state = builder.state
    outputs = builder.add_nodes(
        len(inputs), "hidden", "norm", builder.layer_of(inputs) + 1
    )
    weight = f"{name}.weight"
    if weight in state:
        builder.add_edges(inputs, outputs, state[weight], "norm", weight)
    else:
        builder.add_edges(inputs, outputs, torch.ones(len(inputs)), "norm")
    for key, column in (
        ("bias", "bias"),
        ("running_mean", "running_mean"),
        ("running_var", "running_var"),
    ):
        if f"{name}.{key}" in state:
            builder.place_on_nodes(f"{name}.{key}", outputs, column)
    return outputs
