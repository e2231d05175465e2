"""Fuzzing the neural-graph builder and NGOptimizer.step over random architectures.

Hypothesis draws random stacks of torch modules (linear, (transposed, grouped,
dilated, depthwise) convolutions in 1-3 dimensions, bilinear, batch / layer /
group / RMS / instance norms, embeddings, LSTM / GRU / RNN, multi-head
attention, transformer layers, PReLU, raw parameters of any shape, contiguous
or not), with widths up to 16 that include 1 and 0 (zero-element parameters),
tied (shared) and frozen parameters, channels_last weights, parameters in any
order, up to three param groups (one may join later by ``add_param_group``),
and float32 / float64 / bfloat16 / float16 parameters mixed in one optimizer.
No forward pass is run: gradients are assigned directly (``None``, all zeros,
sparse, or random at scales from 1e-6 to 1e20, sometimes with a NaN), which is
what ``step`` sees after any backward pass, so any module stack is cheap to try.

Properties checked after every one of 1-3 steps:

* ``NeuralGraph.from_parameters`` and ``NGOptimizer.step`` never raise, and
  the graph covers every scalar exactly once;
* every parameter and every state value stays finite;
* a parameter without a gradient is untouched, bit for bit, whatever its dtype;
* a parameter with a gradient receives exactly the step that a float32 copy of
  it receives (rounded to its dtype), and a float32 / float64 parameter with a
  non-zero gradient and ``lr > 0`` changes. (A zero gradient is not required
  to leave the parameter in place: the learned rule also sees the parameter
  values and the momenta, and may move it.)
* a step with a non-finite gradient changes nothing and is counted;
* a parameter not (yet) in the optimizer is untouched;
* a ``state_dict`` / ``load_state_dict`` round trip continues the identical
  trajectory.
"""

from __future__ import annotations

import copy
import itertools
import math
import time
import warnings

import pytest
import torch
from conftest import random_rule
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from lopt import NeuralGraph, NGOptimizer, default_rule_path, load_rule

#: Widths stay small: a case must take milliseconds.
MAX_WIDTH = 16
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
MEMORY_FORMATS = (torch.contiguous_format, torch.contiguous_format, torch.channels_last)
RULES = {"default": load_rule(default_rule_path()), "random": random_rule(seed=3)}

# ----------------------------------------------------------------- strategies
#: Widths, with 0 and 1 (zero-element and single-neuron layers) drawn often.
widths = st.one_of(st.sampled_from((0, 1)), st.integers(0, MAX_WIDTH))
pos_widths = st.one_of(st.just(1), st.integers(1, MAX_WIDTH))
small = st.integers(1, 4)


@st.composite
def convs(draw) -> nn.Module:
    """A (transposed) convolution in 1-3 dims: groups, dilation, kernel and bias
    drawn, channel counts multiples of the groups (possibly zero)."""
    cls = draw(
        st.sampled_from(
            (
                nn.Conv1d,
                nn.Conv2d,
                nn.Conv3d,
                nn.ConvTranspose1d,
                nn.ConvTranspose2d,
                nn.ConvTranspose3d,
            )
        )
    )
    dims = int(cls.__name__[-2])
    groups = draw(st.sampled_from((1, 1, 2, 4)))
    c_in = groups * draw(st.integers(0, 4))
    c_out = groups * draw(st.integers(0, 4))
    kernel = tuple(draw(st.lists(st.integers(1, 3), min_size=dims, max_size=dims)))
    dilation = draw(st.integers(1, 2))
    bias = draw(st.booleans())
    return cls(c_in, c_out, kernel, groups=groups, dilation=dilation, bias=bias)


@st.composite
def depthwise(draw) -> nn.Module:
    """A MobileNet-style depthwise 2-D convolution (groups = in channels)."""
    channels = draw(pos_widths)
    multiplier = draw(st.integers(1, 2))
    k = draw(st.sampled_from((1, 3, 5)))
    return nn.Conv2d(
        channels, channels * multiplier, k, groups=channels, bias=draw(st.booleans())
    )


@st.composite
def norms(draw) -> nn.Module:
    kind = draw(st.sampled_from(("batch", "layer", "group", "rms", "instance")))
    width = draw(widths)
    if kind == "batch":
        cls = draw(st.sampled_from((nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)))
        return cls(width, affine=draw(st.booleans()))
    if kind == "layer":
        shape = (width,) if draw(st.booleans()) else (draw(small), width)
        affine = draw(st.booleans())
        return nn.LayerNorm(shape, elementwise_affine=affine, bias=draw(st.booleans()))
    if kind == "group":
        groups = draw(small)
        return nn.GroupNorm(groups, groups * draw(st.integers(0, 4)))
    if kind == "rms":
        return nn.RMSNorm(width)
    return nn.InstanceNorm2d(width, affine=True)


@st.composite
def recurrents(draw) -> nn.Module:
    cls = draw(st.sampled_from((nn.LSTM, nn.GRU, nn.RNN)))
    hidden = draw(st.integers(1, 8))
    kwargs = dict(
        num_layers=draw(st.integers(1, 2)),
        bias=draw(st.booleans()),
        bidirectional=draw(st.booleans()),
    )
    if cls is nn.LSTM and draw(st.booleans()) and hidden > 1:
        kwargs["proj_size"] = draw(st.integers(1, hidden - 1))
    return cls(draw(st.integers(1, 8)), hidden, **kwargs)


@st.composite
def attentions(draw) -> nn.Module:
    heads = draw(st.integers(1, 3))
    embed = heads * draw(st.integers(1, 4))
    if draw(st.booleans()):
        return nn.TransformerEncoderLayer(
            embed,
            heads,
            dim_feedforward=draw(st.integers(1, MAX_WIDTH)),
            norm_first=draw(st.booleans()),
            bias=draw(st.booleans()),
        )
    # Different key / value widths give separate q, k, v projection weights.
    kdim = draw(st.one_of(st.none(), st.integers(1, 8)))
    vdim = draw(st.one_of(st.none(), st.integers(1, 8)))
    return nn.MultiheadAttention(
        embed,
        heads,
        bias=draw(st.booleans()),
        add_bias_kv=draw(st.booleans()),
        kdim=kdim,
        vdim=vdim,
    )


class Tied(nn.Module):
    """An embedding whose output projection shares its weight (GPT-style)."""

    def __init__(self, vocab: int, dim: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight


class Raw(nn.Module):
    """A bare ``nn.Parameter`` of any shape (0-d scalars, zero-size dims, 4-d),
    contiguous or not (stored with its dimensions reversed)."""

    def __init__(self, shape: tuple[int, ...], contiguous: bool = True):
        super().__init__()
        if contiguous:
            value = torch.randn(shape)
        else:
            dims = tuple(reversed(range(len(shape))))
            value = torch.randn(shape[::-1]).permute(dims)
        self.weight = nn.Parameter(value)

    def extra_repr(self) -> str:
        return f"shape={tuple(self.weight.shape)}, stride={self.weight.stride()}"


#: One strategy per kind of module; a kind is drawn uniformly, then its sizes.
MODULE_KINDS = (
    st.builds(nn.Linear, widths, widths, bias=st.booleans()),
    convs(),
    depthwise(),
    st.builds(nn.Bilinear, pos_widths, small, widths, bias=st.booleans()),
    norms(),
    st.builds(nn.Embedding, widths, widths),
    st.builds(Tied, pos_widths, widths),
    recurrents(),
    attentions(),
    st.builds(nn.PReLU, widths),
    st.builds(Raw, st.lists(st.integers(0, 5), max_size=4).map(tuple), st.booleans()),
)
modules = st.sampled_from(MODULE_KINDS).flatmap(lambda kind: kind)

#: What a parameter's gradient is at one step, and its scale: from vanishing to
#: diverging (1e20 squared overflows float32; in float16 it is inf itself).
GRAD_KINDS = ("none", "zeros", "normal", "normal", "normal", "sparse")
GRAD_SCALES = (1e-6, 1e-2, 1.0, 1e3, 1e20)


class Case:
    """One drawn architecture and everything needed to step it (a plain class:
    hypothesis prints dataclasses field by field, tensors included)."""

    def __init__(
        self,
        *,
        model: nn.ModuleList,
        params: list[nn.Parameter],
        groups: list[dict],
        late_group: bool,
        rule: str,
        grad_kinds: list[list[str]],
        grad_scales: list[float],
        nan_step: int | None,
        round_trip: bool,
        seed: int,
    ):
        self.model, self.params, self.groups = model, params, groups
        self.late_group = late_group  # the last group joins by add_param_group
        self.rule = rule
        self.grad_kinds = grad_kinds  # per step, per parameter
        self.grad_scales = grad_scales  # per step
        self.nan_step = nan_step  # a step whose gradient holds a NaN, if any
        self.round_trip = round_trip
        self.seed = seed

    def __repr__(self) -> str:  # compact: hypothesis prints failing cases
        params = [
            (tuple(p.shape), str(p.dtype)[6:], "train" if p.requires_grad else "frozen")
            for p in self.params
        ]
        groups = [(len(g["params"]), g["lr"], g["weight_decay"]) for g in self.groups]
        return (
            f"Case(model={self.model}, params={params}, "
            f"groups(n, lr, wd)={groups}, late_group={self.late_group}, "
            f"rule={self.rule}, grad_kinds={self.grad_kinds}, "
            f"grad_scales={self.grad_scales}, nan_step={self.nan_step}, "
            f"round_trip={self.round_trip}, seed={self.seed})"
        )


@st.composite
def cases(draw) -> Case:
    """A random module stack, its dtypes, frozen / tied parameters, param
    groups, and per-step gradients."""
    with warnings.catch_warnings():
        # "Initializing zero-element tensors is a no-op": intended here.
        warnings.simplefilter("ignore", UserWarning)
        torch.manual_seed(draw(st.integers(0, 2**16)))
        layers = draw(st.lists(modules, min_size=1, max_size=6))
        if draw(st.booleans()):  # reuse a module: its parameters are shared
            layers.append(layers[draw(st.integers(0, len(layers) - 1))])
        model = nn.ModuleList(layers)
        if not list(model.parameters()):
            model.append(Raw((draw(small),)))
    for layer in model:
        dtype = draw(st.sampled_from(DTYPES[:1] * 3 + DTYPES[1:]))
        # channels_last: 4-d weights that are not contiguous, as users convert CNNs.
        memory_format = draw(st.sampled_from(MEMORY_FORMATS))
        if any(p.dim() == 5 for p in layer.parameters()):  # would need _3d
            memory_format = torch.contiguous_format
        layer.to(dtype=dtype, memory_format=memory_format)
    params = list(model.parameters())  # deduplicated, like any optimizer sees them
    for p in params:
        if draw(st.integers(0, 7)) == 0:
            p.requires_grad_(False)
    if draw(st.booleans()):  # users often pass only the trainable ones
        params = [p for p in params if p.requires_grad] or params
    if draw(st.booleans()):  # any order must work, not only definition order
        params = draw(st.permutations(params))
    # Contiguous param groups with their own lr and weight decay.
    cuts = []
    if len(params) > 1:
        cuts = sorted(draw(st.sets(st.integers(1, len(params) - 1), max_size=2)))
    bounds = [0, *cuts, len(params)]
    groups = [
        dict(
            params=params[a:b],
            lr=draw(st.sampled_from((0.0, 0.5, 1.0, 1.0, 10.0))),
            weight_decay=draw(st.sampled_from((0.0, 0.0, 0.1))),
        )
        for a, b in zip(bounds[:-1], bounds[1:])
    ]
    steps = draw(st.integers(1, 3))
    kinds = [
        [
            "none" if not p.requires_grad else draw(st.sampled_from(GRAD_KINDS))
            for p in params
        ]
        for _ in range(steps)
    ]
    nan_step = draw(st.one_of(st.none(), st.integers(0, steps - 1)))
    if nan_step is not None and draw(st.integers(0, 3)):
        nan_step = None  # a NaN gradient in about one case in eight
    return Case(
        model=model,
        params=params,
        groups=groups,
        late_group=len(groups) > 1 and steps > 1 and draw(st.booleans()),
        rule=draw(st.sampled_from(sorted(RULES))),
        grad_kinds=kinds,
        grad_scales=[draw(st.sampled_from(GRAD_SCALES)) for _ in range(steps)],
        nan_step=nan_step,
        round_trip=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


# ------------------------------------------------------------------- checks
def _gradient(p: torch.Tensor, kind: str, scale: float, gen) -> torch.Tensor | None:
    """A gradient of ``kind`` for ``p``, laid out in memory like ``p`` (as
    autograd makes them: channels_last weights get channels_last gradients)."""
    if kind == "none":
        return None
    if kind == "zeros":
        return torch.zeros_like(p)
    g = torch.randn(p.shape, generator=gen) * scale
    if kind == "sparse":  # mostly zeros, as for embedding rows not looked up
        g = g * (torch.rand(p.shape, generator=gen) < 0.2)
    return torch.empty_like(p, requires_grad=False).copy_(g)


def _all_finite(tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _state_tensors(opt: NGOptimizer) -> list[torch.Tensor]:
    return [v for s in opt.state.values() for v in s.values()]


def _check_graph(params: list[torch.Tensor]) -> NeuralGraph:
    """The graph builds and covers every scalar exactly once."""
    graph = NeuralGraph.from_parameters(params)
    total = sum(p.numel() for p in params)
    assert graph.num_edges + graph.num_slots == graph.num_scalars == total
    assert sorted(graph.tensor_order) == list(range(len(params)))
    if graph.num_edges:
        assert 0 <= int(graph.edge_index.min())
        assert int(graph.edge_index.max()) < graph.num_nodes
    if graph.num_slots:
        assert int(graph.slot_node.max()) < graph.num_nodes
    assert graph.node_attr.shape[0] == graph.num_nodes
    back = graph.unflatten(graph.flatten(params))
    assert all(torch.equal(b, p.float()) for b, p in zip(back, params))
    return graph


def _twin_groups(case: Case, twins: list[torch.Tensor]) -> list[dict]:
    """``case.groups`` over ``twins`` (same lr / weight decay)."""
    out, k = [], 0
    for g in case.groups:
        n = len(g["params"])
        out.append({**g, "params": twins[k : k + n]})
        k += n
    return out


def run_case(case: Case) -> None:
    """Step ``case`` and check every property of the module docstring."""
    params = case.params
    _check_graph(params)
    rule = RULES[case.rule]
    groups = case.groups
    # A float32 twin of every parameter, re-synced before each step: lopt
    # computes in float32, so each parameter must get the twin's step.
    twins = [torch.zeros(p.shape, requires_grad=True) for p in params]
    twin_groups = _twin_groups(case, twins)
    first = len(groups) - 1 if case.late_group else len(groups)
    opt = NGOptimizer(groups[:first], rule=rule)
    twin_opt = NGOptimizer(twin_groups[:first], rule=rule)
    gen = torch.Generator().manual_seed(case.seed)
    lrs = [g["lr"] for g in groups for _ in g["params"]]
    in_opt = [i < first for i, g in enumerate(groups) for _ in g["params"]]
    for step, kinds in enumerate(case.grad_kinds):
        if step == 1 and case.late_group:  # the graph is rebuilt, state kept
            opt.add_param_group(groups[-1])
            twin_opt.add_param_group(twin_groups[-1])
            in_opt = [True] * len(params)
        scale = case.grad_scales[step]
        grads = [_gradient(p, k, scale, gen) for p, k in zip(params, kinds)]
        if step == case.nan_step:
            target = next((g for g in grads if g is not None and g.numel()), None)
            if target is not None:
                target[(0,) * target.dim()] = math.nan
        # A NaN, or a huge gradient that is inf in float16 (or in float32).
        stepped = [g for g, on in zip(grads, in_opt) if on and g is not None]
        finite = all(bool(torch.isfinite(g.float()).all()) for g in stepped)
        before = [p.detach().clone() for p in params]
        state_before = [t.clone() for t in _state_tensors(opt)]
        skipped = opt.skipped_steps
        with torch.no_grad():
            for p, g, t in zip(params, grads, twins):
                p.grad = g
                t.copy_(p)
                t.grad = None if g is None else g.float()
        opt.step()
        twin_opt.step()

        assert _all_finite(params)
        assert _all_finite(_state_tensors(opt))
        for p, b, on in zip(params, before, in_opt):
            if not on:
                assert torch.equal(p, b), "a parameter outside the optimizer moved"
        if not finite:
            assert opt.skipped_steps == skipped + 1
            assert all(torch.equal(p, b) for p, b in zip(params, before))
            state = _state_tensors(opt)
            if state_before:
                assert all(torch.equal(a, b) for a, b in zip(state, state_before))
            else:  # the first step was skipped: the state is still fresh,
                # zero but for the step-size adaptation's trace of the weights
                for p, s in opt.state.items():
                    for key, t in s.items():
                        if key == "trace":
                            assert torch.equal(t, p.detach().float().reshape(t.shape))
                        else:
                            assert not t.any(), key
            continue
        assert opt.skipped_steps == skipped
        for p, g, b, t, lr, on in zip(params, grads, before, twins, lrs, in_opt):
            if not on:
                continue
            if g is None:
                assert torch.equal(p, b), "a parameter without a gradient moved"
                continue
            if p.dtype == torch.float64:
                # The float32 step, added to the full-precision value.
                expected = b + (t.detach() - b.float()).double()
                torch.testing.assert_close(p, expected, rtol=1e-12, atol=1e-30)
            else:
                assert torch.equal(p, t.detach().to(p.dtype)), "not the float32 step"
            if p.dtype in (torch.float32, torch.float64) and lr > 0 and g.any():
                assert not torch.equal(p, b), "a parameter with a gradient is stuck"

    if case.round_trip:
        _check_round_trip(case, opt, gen)


def _check_round_trip(case: Case, opt: NGOptimizer, gen: torch.Generator) -> None:
    """A state_dict round trip into a fresh optimizer over copies of the
    parameters continues the identical trajectory."""
    params = [p for g in opt.param_groups for p in g["params"]]
    copies = [nn.Parameter(p.detach().clone(), p.requires_grad) for p in params]
    sizes = [len(g["params"]) for g in opt.param_groups]
    bounds = [0, *itertools.accumulate(sizes)]
    twin = NGOptimizer(
        [
            {**g, "params": copies[a:b]}
            for g, a, b in zip(opt.param_groups, bounds[:-1], bounds[1:])
        ],
        rule=opt.rule,
    )
    twin.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert twin.skipped_steps == opt.skipped_steps
    for p, q in zip(params, copies):
        for key, value in opt.state[p].items():
            assert torch.equal(twin.state[q][key], value), key
    for p, q in zip(params, copies):
        g = _gradient(p, "normal", 1.0, gen) if p.requires_grad else None
        p.grad = g
        q.grad = None if g is None else g.clone()
    opt.step()
    twin.step()
    assert all(torch.equal(p, q) for p, q in zip(params, copies))


# -------------------------------------------------------------------- tests
_HEALTH = [
    HealthCheck.too_slow,
    HealthCheck.data_too_large,
    HealthCheck.large_base_example,
]


def fuzz(max_examples: int) -> int:
    """Run the fuzzer on ``max_examples`` architectures; return how many ran."""
    count = 0

    @settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=_HEALTH,
        print_blob=True,
    )
    @given(cases())
    def check(case: Case) -> None:
        nonlocal count
        count += 1
        run_case(case)

    check()
    return count


def test_fuzz_graph_and_step_on_300_architectures():
    """At least 300 random architectures build a graph and take 1-3 steps (and
    sometimes a state_dict round trip) with no exception, finite parameters and
    state, untouched parameters without gradients, the float32 step for every
    dtype, and moving parameters with gradients."""
    n = fuzz(300)
    assert n >= 300, f"only {n} architectures tried"


@pytest.mark.slow
def test_fuzz_graph_and_step_on_5000_architectures():
    """The same properties as the default fuzz test, over 5,000 architectures."""
    start = time.perf_counter()
    n = fuzz(5000)
    print(f"fuzz: {n} architectures, 0 crashes ({time.perf_counter() - start:.0f} s)")
    assert n >= 5000, f"only {n} architectures tried"


# ------------------------------------------------ regressions the fuzzer found
def test_float64_parameter_without_gradient_is_bit_identical():
    """A float64 parameter without a gradient is left bit-identical while
    another parameter steps (it used to get its float32-rounded copy written
    back)."""
    stepped = nn.Parameter(torch.randn(3, 2))
    idle = nn.Parameter(torch.full((4,), 1 / 3, dtype=torch.float64))
    before = idle.detach().clone()
    opt = NGOptimizer([stepped, idle], rule=RULES["default"])
    stepped.grad = torch.ones(3, 2)
    opt.step()
    assert torch.equal(idle, before)
    assert idle.float().double().ne(before).all()  # float32 would have moved it


@pytest.mark.parametrize("lr", [0.0, 1.0])
def test_float64_parameter_gets_the_float32_step_on_its_full_value(lr):
    """A float64 parameter gets the float32 step added to its full-precision
    value (it used to be overwritten by float32 results, losing its low bits
    every step, and moving even with ``lr=0``)."""
    value = torch.full((4, 3), 1 / 3, dtype=torch.float64) + torch.randn(4, 3) / 7
    w = nn.Parameter(value.clone())
    twin = nn.Parameter(value.float())
    grad = torch.randn(4, 3, dtype=torch.float64)
    opts = [NGOptimizer([p], lr=lr, rule=RULES["default"]) for p in (w, twin)]
    w.grad, twin.grad = grad, grad.float()
    for opt in opts:
        opt.step()
    torch.testing.assert_close(
        w, value + (twin.detach() - value.float()).double(), rtol=1e-12, atol=0
    )
    if lr == 0.0:
        assert torch.equal(w, value)
    else:
        assert not torch.equal(w, value)


def test_huge_finite_gradient_keeps_parameters_and_state_finite():
    """A finite gradient whose square overflows float32 (above about 1.8e19, as
    in a diverging run) is stepped and leaves parameters and state finite, also
    at the following steps (the second moment used to become inf, and the next
    step's moving average computed inf - inf = NaN into the parameters)."""
    torch.manual_seed(0)
    layer = nn.Linear(3, 4)
    opt = NGOptimizer(layer.parameters(), rule=RULES["default"])
    for scale in (1e20, 1e20, 1.0, 1.0):
        before = [p.detach().clone() for p in layer.parameters()]
        for p in layer.parameters():
            p.grad = torch.randn_like(p) * scale
        opt.step()
        assert opt.skipped_steps == 0
        assert _all_finite(layer.parameters())
        assert _all_finite(_state_tensors(opt))
        assert all(not torch.equal(p, b) for p, b in zip(layer.parameters(), before))
