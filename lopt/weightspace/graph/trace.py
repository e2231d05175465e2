"""Exact connectivity of a module from its ``torch.fx`` trace, as a graph of
weights.

The trace is read by the core's :class:`lopt.tracing.FxWalker` (shared with the
optimizer's :meth:`lopt.graph.NeuralGraph.from_module`); here is what each
part becomes in a :class:`~lopt.weightspace.graph.builder.GraphBuilder`:

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

import torch
from torch import fx, nn

from lopt.tracing import FxWalker, TracedValue, guess_spatial_shape, trace_module
from lopt.weightspace.graph.builder import GraphBuilder

__all__ = ["trace_into", "guess_spatial_shape", "add_norm_layer"]


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
    gm = trace_module(module, example_inputs)
    return _Walker(gm, builder).run()


class _Walker(FxWalker):
    def __init__(self, gm: fx.GraphModule, builder: GraphBuilder):
        super().__init__(gm, {k: v.shape for k, v in builder.state.items()})
        self.b = builder

    def finish_values(self) -> None:
        # After the walk: a network input gets its neurons when a layer first
        # reads it, after its own trace node was seen.
        for fx_node, value in self.env.items():
            if value.nodes is not None and not value.flat:
                self.b.record_value(fx_node.name, value.nodes)

    def new_inputs(self, count: int) -> torch.Tensor:
        return self.b.add_nodes(count, "input", "input", 0)

    def activation(self, nodes: torch.Tensor, activation: str) -> None:
        self.b.set_activation(nodes, activation)

    def layer(self, name, inputs, out, kernel, layer_type) -> torch.Tensor:
        weight = self.b.state[f"{name}.weight"]
        kernels = weight.reshape(out * len(inputs), *kernel)
        layer = self.b.layer_of(inputs) + 1
        outputs = self.b.add_nodes(out, "hidden", layer_type, layer)
        src = inputs.repeat(out)
        dst = outputs.repeat_interleave(len(inputs))
        self.b.add_edges(src, dst, kernels, layer_type, f"{name}.weight")
        if f"{name}.bias" in self.b.state:
            self.b.place_on_nodes(f"{name}.bias", outputs, "bias")
        return outputs

    def norm(self, name: str, inputs: torch.Tensor) -> torch.Tensor:
        return add_norm_layer(self.b, name, inputs)

    def residual(self, operands, nodes) -> TracedValue:
        a, b = (self.env[o] for o in operands)
        count = len(nodes[0])
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
        return TracedValue(out, conv_dims=max(a.conv_dims, b.conv_dims))


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
