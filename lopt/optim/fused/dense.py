"""Dense layers as tensors: the learned step without gathers over edges.

Every edge of a :class:`~lopt.graph.NeuralGraph` built by shape inference
belongs to a weight tensor ``(out, in, *kernel)``. Its edges are that tensor:
edge ``(o, i, t)`` goes from input node ``src + i // repeat`` to output node
``dst + o`` (``repeat > 1`` where a linear layer reads a flattened conv
output). Seen as a ``(C, out, in / repeat, repeat * taps)`` view of a
channel-major edge buffer, a gather from a node table is a broadcast along an
axis, and a node's fan-in or fan-out aggregation is a reduction over the other
axes: no ``edge_index`` is read.

:func:`dense_layout` finds these blocks (or returns ``None`` for a graph whose
edges are not all dense, which then takes the edge-list path).
:func:`fused_step` is :func:`lopt.optim.functional.ng_step` on them, without
autograd: the per-edge pipeline (momenta, features, edge encoder, FiLM
messages with their fan-in/fan-out sums, edge update, edge head, update) runs
in ``lopt/optim/fused/csrc/ng_dense.c`` in four passes over memory, everything per edge
in registers, reading the parameters and gradients where they are and
writing the parameters in place (no flat copies: the step adds about one
byte per parameter to peak memory); node-level work (few rows) stays in
PyTorch and reuses the rule's own modules. Its updates equal the
reference path's to float32 rounding (``tests/optim/test_fused.py``).
Meta-training differentiates through the reference path, which computes
the same function.

The kernel is hand-written C, not ``torch.compile`` output. It is bound by
floating-point throughput: ``ng_update`` is about 450 vector multiply-adds
and exp/reciprocal steps per 8 edges, so a cheaper step needs less work per
edge (a different rule), not a better kernel. Why, and the measurements
behind it: ``docs/design-notes-code.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from lopt.graph import EDGE_ATTR_DIM, NUM_SLOT_TYPES, NeuralGraph
from lopt.nn.conv import _STD_EPS, mean_std_from_sums
from lopt.optim.features import (
    EPS,
    MOMENTUM_DECAYS,
    NUM_FEATURES,
    RATIO_EPS,
    SECOND_MOMENT_DECAY,
    FeatureState,
    time_features,
)
from lopt.optim.fused import cpu_kernel
from lopt.optim.step_size import adaptation_started, next_log_step

__all__ = ["DenseBlock", "DensePlan", "dense_layout", "fused_supported", "fused_step"]


class DenseBlock(NamedTuple):
    """One weight tensor's edges as a dense block of the flat edge vector."""

    offset: int  # first scalar (= first edge) of the tensor in graph order
    out: int  # output nodes: dst + 0 .. dst + out - 1
    sources: int  # input nodes: src + 0 .. src + sources - 1
    inner: int  # edges per (output, input node) pair: repeat * taps
    dst: int
    src: int

    @property
    def numel(self) -> int:
        return self.out * self.sources * self.inner

    def view(self, x: torch.Tensor) -> torch.Tensor:
        """The block's slice of a channel-major ``(C, E)`` tensor as
        ``(C, out, sources, inner)``."""
        part = x[:, self.offset : self.offset + self.numel]
        return part.view(x.shape[0], self.out, self.sources, self.inner)


def dense_layout(graph: NeuralGraph) -> tuple[DenseBlock, ...] | None:
    """The dense blocks covering every edge of ``graph``, or ``None`` when some
    tensor's edges do not form one (then only the edge-list path applies)."""
    src, dst = graph.edge_index.cpu()
    blocks = []
    offset = 0
    for position, index in enumerate(graph.tensor_order):
        if offset >= graph.num_edges:
            break
        shape = graph.shapes[index]
        numel = graph.numels[position]
        if len(shape) < 2:
            return None
        out, inn = shape[0], shape[1]
        taps = numel // (out * inn)
        s = src[offset : offset + numel].view(out, inn, taps)
        d = dst[offset : offset + numel].view(out, inn, taps)
        s0, d0 = int(s[0, 0, 0]), int(d[0, 0, 0])
        sources = int(s[0, -1, 0]) - s0 + 1
        if sources < 1 or inn % sources:
            return None
        repeat = inn // sources
        want_s = s0 + torch.arange(inn) // repeat
        want_d = d0 + torch.arange(out)
        if not (
            torch.equal(s, want_s[None, :, None].expand_as(s))
            and torch.equal(d, want_d[:, None, None].expand_as(d))
        ):
            return None
        blocks.append(DenseBlock(offset, out, sources, repeat * taps, d0, s0))
        offset += numel
    if offset != graph.num_edges:
        return None
    return tuple(blocks)


def fused_supported(rule, graph: NeuralGraph, device: torch.device) -> str | None:
    """``None`` when :func:`fused_step` applies to ``rule`` on ``graph``,
    otherwise the reason it does not (the reference path is taken)."""
    c = rule.config
    if device.type != "cpu":
        return f"parameters on {device.type} (the fused kernel is CPU-only)"
    if (c.num_layers, c.edge_dim, c.head_hidden) != (1, 4, 8):
        return (
            "rule widths other than num_layers=1, edge_dim=4, head_hidden=8 "
            f"(got {c.num_layers}, {c.edge_dim}, {c.head_hidden})"
        )
    if (c.edge_mlp, c.edge_hidden) not in ((True, 8), (False, 0)):
        return (
            "an edge pipeline other than edge_mlp=True with an edge head of width "
            "8, or edge_mlp=False with a linear edge head (got edge_mlp="
            f"{c.edge_mlp}, edge head hidden {c.edge_hidden})"
        )
    if rule.backbone.layers[0].msg_dim != 4:
        return "message width other than 4"
    if rule.learned_output_is_zero:
        return (
            "a rule whose learned output is zero (the base rule): its update is "
            "the Adam ratio, which the reference step computes without the "
            "graph network"
        )
    if graph.num_edges and dense_layout(graph) is None:
        return "edges that do not form dense blocks"
    return None


class DensePlan:
    """Everything :func:`fused_step` needs of a graph, computed once: the
    block table, per-tensor segments, kernel attributes per block column,
    and the slots' tensor positions."""

    def __init__(self, graph: NeuralGraph):
        blocks = dense_layout(graph) or ()
        self.graph = graph
        self.blocks = blocks
        self.table = torch.tensor(
            [[b.offset, b.out, b.sources, b.inner, b.dst, b.src] for b in blocks],
            dtype=torch.int64,
        ).reshape(-1, 6)
        lengths = graph.segment_lengths.cpu()
        self.segments = torch.cat(
            [torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]
        )
        self.numels = lengths.to(torch.float64)
        inner = [b.inner for b in blocks]
        self.kc_off = torch.tensor(
            [sum(inner[:i]) for i in range(len(blocks))], dtype=torch.int64
        )
        # Static attributes of each block's first row: its inner axis (none
        # stored when every weight is one tap: they would all be zero).
        attr = graph.kernel_attr
        self.kernel_attr = (
            torch.cat([attr[:, b.offset : b.offset + b.inner].cpu() for b in blocks], 1)
            if blocks and attr is not None
            else torch.zeros(EDGE_ATTR_DIM, sum(inner))
        ).contiguous()
        self.has_kernel_attr = graph.kernel_attr is not None
        self.slot_pos = graph.tensor_position.cpu()[
            graph.tensor_id[graph.num_edges :].long()
        ]
        self.lr_index = torch.tensor([b.offset for b in blocks], dtype=torch.int64)
        self.slot_sizes = graph.numels[len(blocks) :]
        self.slot_lengths = torch.tensor(self.slot_sizes, dtype=torch.int64)


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def pack_weights(rule) -> torch.Tensor:
    """The edge pipeline's weights in the kernel's order (see ng_dense.c)."""
    bb, head = rule.backbone, rule.edge_head
    layer = bb.layers[0]
    nf = NUM_FEATURES
    if not rule.config.edge_mlp:  # the lean rule
        parts = [
            bb.edge_encoder.weight[:, :nf],
            bb.edge_encoder.bias,
            layer.film.weight,
            layer.film.bias,
            head.out.weight,
            head.out.bias,
            head.skip.weight,
        ]
        return torch.cat([p.detach().reshape(-1).float() for p in parts]).contiguous()
    parts = [
        bb.edge_encoder.weight[:, :nf],
        bb.edge_encoder.bias,
        layer.film.weight,
        layer.film.bias,
        layer.edge_lin.weight,
        layer.edge_lin.bias,
        layer.edge_out.weight,
        layer.edge_out.bias,
        head.embed_in.weight,
        head.embed_in.bias,
        head.feat_in.weight,
        head.out.weight,
        head.out.bias,
        head.skip.weight,
    ]
    return torch.cat([p.detach().reshape(-1).float() for p in parts]).contiguous()


def _per_block(value, plan: DensePlan) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().float()[plan.lr_index].contiguous()
    return torch.full((len(plan.blocks),), float(value))


def _addresses(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64)


def _flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    if not tensors:
        return torch.zeros(0)
    return torch.cat([t.reshape(-1) for t in tensors])


@torch.no_grad()
def fused_step(
    lib,
    plan: DensePlan,
    rule,
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    state: FeatureState,
    lr: float | torch.Tensor = 1.0,
    weight_decay: float | torch.Tensor = 0.0,
) -> bool:
    """:func:`lopt.optim.functional.ng_step` through the fused CPU kernel, in place.

    Args:
        params, grads: every parameter tensor and its gradient **in graph
            order** (``plan.graph.tensor_order``), float32, contiguous, on the
            CPU. They are read where they are (no flat copies), and the new
            parameters are written into ``params``.
        state: updated in place (step, momenta, second moment).
        lr, weight_decay: floats, or ``(P,)`` per-scalar tensors.

    Returns:
        ``False``, having changed nothing, when some gradient is not finite;
        ``True`` after a step. The updates equal the reference path's within
        float32 rounding (tested).

    Raises:
        ValueError: before the kernel reads anything, when the packed rule
            weights are not the size the kernel reads
            (:func:`~lopt.optim.fused.cpu_kernel.check_weights`).
    """
    graph = plan.graph
    c = rule.config
    weights = pack_weights(rule)
    cpu_kernel.check_weights(lib, weights, lean=not c.edge_mlp)  # before any read
    P, E, N = graph.num_scalars, graph.num_edges, graph.num_nodes
    momenta, second = state.momenta, state.second_moment
    nseg = len(plan.numels)
    pa, ga = _addresses(params), _addresses(grads)
    sums = torch.zeros(nseg, 2 + len(MOMENTUM_DECAYS), dtype=torch.float64)
    if lib.ng_norms(_ptr(plan.segments), nseg, _ptr(pa), _ptr(ga), _ptr(sums)):
        return False
    state.step.add_(1)
    if P == 0:  # only empty tensors: nothing to update (as ng_step)
        return True
    nb = len(plan.blocks)
    if rule.step_size.enabled:
        lr_blocks, lr_slots = _adapt_step_sizes(
            lib, plan, rule.step_size, pa, ga, state, sums
        )
    t = state.step
    betas = torch.tensor(MOMENTUM_DECAYS, dtype=torch.float32)
    lib.ng_moments(
        _ptr(plan.segments), nseg, P, _ptr(ga), _ptr(momenta), _ptr(second),
        _ptr(betas), SECOND_MOMENT_DECAY, _ptr(sums),
    )  # fmt: skip
    inv = torch.rsqrt(sums / plan.numels[:, None] + EPS).float()  # (T, 6)
    mcorr = 1.0 / (1.0 - betas.double() ** t.double())
    vcorr = float(1.0 / (1.0 - SECOND_MOMENT_DECAY ** t.double()))
    mcorr = mcorr.float()
    # Slot features (few): the reference formulas on the slot scalars.
    slot_params = params[nb:]
    p_slots, g_slots = _flat(slot_params), _flat(grads[nb:])
    raw = torch.cat([p_slots[None], g_slots[None], momenta[:, E:]])
    slot_inv = inv.T[:, plan.slot_pos]
    ratios = (
        momenta[:, E:] * mcorr[:, None] * torch.rsqrt(second[E:] * vcorr + RATIO_EPS)
    )
    slot_feats = torch.cat([raw * slot_inv, ratios])
    time = time_features(t)
    backbone = rule.backbone
    layer = backbone.layers[0]
    h = backbone.node_encoder(rule.node_inputs(graph, slot_feats, time))
    kc = (
        backbone.edge_encoder.weight[:, NUM_FEATURES:] @ plan.kernel_attr
        if plan.has_kernel_attr
        else torch.zeros(4, plan.kernel_attr.shape[1])
    ).contiguous()
    inv_blocks = inv[: len(plan.blocks)].contiguous()
    if E:
        ts = layer.lin_src(h).T.contiguous()
        td = layer.lin_dst(h).T.contiguous()
        fan_in = torch.zeros(8, N)
        fan_out = torch.zeros(8, N)
        lib.ng_messages(
            _ptr(plan.table), nb, P, _ptr(pa), _ptr(ga),
            _ptr(momenta), _ptr(second), _ptr(inv_blocks), _ptr(mcorr), vcorr,
            _ptr(weights), _ptr(kc), _ptr(plan.kc_off), kc.shape[1], _ptr(ts),
            _ptr(td), N, _ptr(fan_in), _ptr(fan_out),
        )  # fmt: skip
        degree = graph.degree
        in_mean, in_std = mean_std_from_sums(fan_in, degree.fan_in, 4)
        out_mean, out_std = mean_std_from_sums(fan_out, degree.fan_out, 4)
        h = h + layer.node_mlp(torch.cat([h, in_mean, in_std, out_mean, out_std], 1))
        es = layer.edge_src(h).T.contiguous()
        ed = layer.edge_dst(h).T.contiguous()
        lr_b, wd_b = _per_block(lr, plan), _per_block(weight_decay, plan)
        if rule.step_size.enabled:
            lr_b = lr_b * lr_blocks
        update_edges = lib.ng_update if c.edge_mlp else lib.ng_update_lean
        update_edges(
            _ptr(plan.table), nb, P, _ptr(pa), _ptr(ga),
            _ptr(momenta), _ptr(second), _ptr(inv_blocks), _ptr(mcorr), vcorr,
            _ptr(weights), _ptr(kc), _ptr(plan.kc_off), kc.shape[1], _ptr(es),
            _ptr(ed), N, _ptr(lr_b), _ptr(wd_b), c.step_scale,
            c.magnitude_scale, c.magnitude_clip,
        )  # fmt: skip
    else:
        h = _node_update_without_edges(layer, h)
    if graph.num_slots:
        slot_type = nn.functional.one_hot(graph.slot_type, NUM_SLOT_TYPES).to(h.dtype)
        embed = torch.cat([h[graph.slot_node], slot_type], dim=1).T
        out = rule.slot_head(embed, slot_feats)
        update = rule._to_update(out[0], out[1])
        if isinstance(weight_decay, torch.Tensor) or weight_decay != 0.0:
            update = update - c.step_scale * _slots(weight_decay, E) * p_slots
        lr_s = _slots(lr, E)
        if rule.step_size.enabled:
            lr_s = lr_s * lr_slots
        new = p_slots + lr_s * update
        torch._foreach_copy_(
            [t.view(-1) for t in slot_params], list(new.split(plan.slot_sizes))
        )
    return True


def _adapt_step_sizes(lib, plan: DensePlan, config, pa, ga, state, sums):
    """:func:`lopt.optim.step_size.adapt_step_sizes` on the fused path: the dots
    per tensor from the kernel (which also moves the trace in place), the
    new log steps and statistics written into ``state.log_step`` and
    ``state.adapt_stats``. Returns the step multipliers of the dense blocks
    ``(num blocks,)`` and of the slot scalars ``(P - E,)``."""
    nseg = len(plan.numels)
    if not adaptation_started(config, plan.graph, state):
        raise ValueError("the step-size adaptation's state is missing")
    dots = torch.zeros(nseg, 2, dtype=torch.float64)
    lib.ng_trace(
        _ptr(plan.segments), nseg, _ptr(pa), _ptr(ga), _ptr(state.trace),
        1.0 - config.decay, _ptr(dots),
    )  # fmt: skip
    log_step, adapt_stats = next_log_step(
        config, state.log_step, dots[:, 0], sums[:, 1], dots[:, 1], state.adapt_stats
    )
    state.log_step.copy_(log_step)
    state.adapt_stats.copy_(adapt_stats)
    multiplier = torch.exp(log_step)
    nb = len(plan.blocks)
    slots = torch.repeat_interleave(
        multiplier[nb:], plan.slot_lengths, output_size=plan.graph.num_slots
    )
    return multiplier[:nb], slots


def _slots(value, start: int):
    return value[start:] if isinstance(value, torch.Tensor) else value


def _node_update_without_edges(layer, h: torch.Tensor) -> torch.Tensor:
    """The node update of a graph without edges: every aggregation is empty
    (mean 0, std sqrt(eps)), as in the reference layer."""
    zeros = h.new_zeros(h.shape[0], layer.msg_dim)
    std = torch.full_like(zeros, _STD_EPS**0.5)
    return h + layer.node_mlp(torch.cat([h, zeros, std, zeros, std], 1))
