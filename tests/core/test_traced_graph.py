"""NeuralGraph.from_module: the module's exact graph from its fx trace, and
NGOptimizer(model=..., graph="traced") that uses it."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import mlp, random_rule, regression_data, train
from torch import nn

from lopt import NGOptimizer, RuleConfig
from lopt.graph import NeuralGraph, Unsupported
from lopt.optim.fused import cpu_kernel


class ResidualMLP(nn.Module):
    """``Linear -> [x + fc2(tanh(fc1(x)))] -> LayerNorm -> Linear``."""

    def __init__(self, seed: int = 0, width: int = 6):
        super().__init__()
        torch.manual_seed(seed)
        self.fc_in = nn.Linear(4, width)
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        h = torch.tanh(self.fc_in(x))
        h = h + self.fc2(torch.tanh(self.fc1(h)))
        return self.head(self.norm(h))


def small_cnn(seed: int = 0) -> nn.Sequential:
    """A conv without bias before BatchNorm; a linear after a flatten."""
    torch.manual_seed(seed)
    layers = [nn.Conv2d(2, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU()]
    layers += [nn.Conv2d(4, 5, 3), nn.Tanh(), nn.Flatten(), nn.Linear(20, 3)]
    return nn.Sequential(*layers)


class TinyAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        q, k, v = self.qkv(x).split(8, dim=-1)
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y)


def tiny_lstm() -> nn.LSTM:
    """An LSTM as the whole model (its output is a tuple)."""
    return nn.LSTM(4, 6, batch_first=True)


def _same_structure(a: NeuralGraph, b: NeuralGraph) -> None:
    for name in ("edge_index", "slot_node", "slot_type", "node_attr", "tensor_id"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.num_nodes == b.num_nodes
    assert a.tensor_order == b.tensor_order
    assert (a.kernel_attr is None) == (b.kernel_attr is None)
    if a.kernel_attr is not None:
        assert torch.equal(a.kernel_attr, b.kernel_attr)


def test_plain_mlp_traced_graph_equals_shape_inference():
    model = mlp(sizes=(4, 6, 5, 3))
    params = list(model.parameters())
    _same_structure(
        NeuralGraph.from_module(model, params), NeuralGraph.from_parameters(params)
    )


def test_residual_sum_merges_neurons():
    model = ResidualMLP()
    params = list(model.parameters())
    traced = NeuralGraph.from_module(model, params)
    shapes = NeuralGraph.from_parameters(params)
    assert traced.num_scalars == shapes.num_scalars == sum(p.numel() for p in params)
    assert traced.num_edges + traced.num_slots == traced.num_scalars
    # fc2's outputs are fc_in's neurons: 6 fewer nodes.
    assert traced.num_nodes == shapes.num_nodes - 6 == 4 + 6 + 6 + 3
    dst_fc2 = traced.edge_index[1, traced.tensor_id[: traced.num_edges] == 4]
    dst_fc_in = traced.edge_index[1, traced.tensor_id[: traced.num_edges] == 0]
    assert set(dst_fc2.tolist()) == set(dst_fc_in.tolist())
    # Each bias is its layer's first vector (type 0); the norm's gain and
    # shift come after the biases on the merged neurons (types 1 and 2).
    slots = traced.tensor_id[traced.num_edges :].long()
    gain = traced.slot_node[slots == 6].long()
    assert set(gain.tolist()) == set(dst_fc_in.tolist())
    for index, stype in ((1, 0), (5, 0), (6, 1), (7, 2)):
        assert traced.slot_type[slots == index].unique().tolist() == [stype]


def test_cnn_norm_is_slots_of_its_channels_and_flatten_maps_to_channels():
    model = small_cnn()
    params = list(model.parameters())
    traced = NeuralGraph.from_module(model, params)
    # conv1 (no bias) then BN: like shape inference, BN's gain is type 0.
    _same_structure(traced, NeuralGraph.from_parameters(params))
    assert traced.num_nodes == 2 + 4 + 5 + 3


def test_groups_in_any_order_give_the_same_traced_graph():
    model = ResidualMLP()
    params = list(model.parameters())
    order = [6, 0, 3, 7, 9, 1, 8, 5, 2, 4]
    shuffled = [params[i] for i in order]
    a = NeuralGraph.from_module(model, params)
    b = NeuralGraph.from_module(model, shuffled)
    assert [id(params[i]) for i in a.tensor_order] == [
        id(shuffled[i]) for i in b.tensor_order
    ]
    for name in ("edge_index", "slot_node", "slot_type", "node_attr"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_frozen_parameters_are_left_out():
    model = ResidualMLP()
    params = [p for n, p in model.named_parameters() if not n.startswith("fc_in")]
    traced = NeuralGraph.from_module(model, params)
    assert traced.num_scalars == sum(p.numel() for p in params)
    assert traced.num_nodes == 6 + 6 + 3  # no input neurons: nothing reads them


@pytest.mark.parametrize("make", [TinyAttention, tiny_lstm])
def test_unsupported_models_raise(make):
    model = make()
    with pytest.raises(Unsupported):
        NeuralGraph.from_module(model, list(model.parameters()))


def test_shared_weights_raise():
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))
    model[2].weight = model[0].weight
    with pytest.raises(Unsupported, match="used twice"):
        NeuralGraph.from_module(model, list(model.parameters()))


def test_foreign_parameter_is_named():
    model = mlp()
    with pytest.raises(ValueError, match="not a parameter of Sequential"):
        NeuralGraph.from_module(model, [nn.Parameter(torch.zeros(3))])


# ----------------------------------------------------- NGOptimizer(graph=...)
def _step(model, opt, x, y):
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()


def test_graph_argument_is_checked():
    model = mlp()
    with pytest.raises(ValueError, match="Invalid graph: 'exact'"):
        NGOptimizer(model.parameters(), model=model, graph="exact")
    with pytest.raises(ValueError, match="Invalid graph: 'traced' needs"):
        NGOptimizer(model.parameters(), graph="traced")


def test_traced_optimizer_uses_the_traced_graph():
    model = ResidualMLP()
    opt = NGOptimizer(model.parameters(), model=model, graph="traced")
    _same_structure(opt.graph, NeuralGraph.from_module(model, list(model.parameters())))
    shapes = NGOptimizer(model.parameters(), model=model)
    assert shapes.graph.num_nodes == opt.graph.num_nodes + 6


@pytest.mark.parametrize(
    "make, x_shape", [(ResidualMLP, (32, 4)), (small_cnn, (16, 2, 6, 6))]
)
def test_traced_graph_trains(make, x_shape):
    model = make()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*x_shape, generator=gen)
    y = torch.randn(x_shape[0], 3, generator=gen)
    opt = NGOptimizer(model.parameters(), model=model, graph="traced")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # traced: no fallback warning
        losses = train(model, opt, x, y, steps=30)
    assert losses[-1] < 0.7 * losses[0]


def test_groups_in_any_order_give_the_same_trajectory_traced():
    models = [ResidualMLP(), ResidualMLP()]
    decay = [p for p in models[1].parameters() if p.dim() >= 2]
    no_decay = [p for p in models[1].parameters() if p.dim() < 2]
    opts = [
        NGOptimizer(models[0].parameters(), model=models[0], graph="traced"),
        NGOptimizer(
            [{"params": no_decay[::-1]}, {"params": decay}],
            model=models[1],
            graph="traced",
        ),
    ]
    x, y = regression_data()
    for _ in range(3):
        for model, opt in zip(models, opts):
            _step(model, opt, x, y)
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(p, q, atol=0, rtol=0)


@pytest.mark.parametrize(
    "make, x_shape", [(TinyAttention, (2, 5, 8)), (tiny_lstm, (2, 5, 4))]
)
def test_unsupported_models_fall_back_with_one_warning(make, x_shape):
    model = make()
    params = list(model.parameters())
    opt = NGOptimizer(params[:2], model=model, graph="traced")
    with pytest.warns(UserWarning, match=r"graph='traced'.*unsupported \(.+\)"):
        graph = opt.graph
    _same_structure(graph, NeuralGraph.from_parameters(params[:2]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        opt.add_param_group({"params": params[2:]})
        _same_structure(opt.graph, NeuralGraph.from_parameters(params))
        opt.zero_grad()
        out = model(torch.randn(*x_shape))
        out = out[0] if isinstance(out, tuple) else out
        out.square().mean().backward()
        opt.step()


@pytest.mark.parametrize(
    "make, x_shape", [(ResidualMLP, (32, 4)), (small_cnn, (16, 2, 6, 6))]
)
def test_fused_and_reference_steps_agree_on_a_traced_graph(make, x_shape):
    if cpu_kernel.load() is None:
        pytest.skip("the fused CPU kernel could not be built")
    models = [make(), make()]
    rule = random_rule(5, RuleConfig())  # the shipped shape: the kernel applies
    opts = [
        NGOptimizer(m.parameters(), model=m, graph="traced", rule=rule, fused=f)
        for m, f in zip(models, (None, False))
    ]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*x_shape, generator=gen)
    y = torch.randn(x_shape[0], 3, generator=gen)
    for _ in range(3):
        for model, opt in zip(models, opts):
            _step(model, opt, x, y)
    assert opts[0]._plan is not None and opts[1]._plan is None
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(p, q)


def _permute_residual_mlp(model):
    """The residual stream's neurons (``p``: fc_in and fc2 outputs, the norm,
    the head's inputs) and the block's hidden neurons (``q``)."""
    gen = torch.Generator().manual_seed(1)
    p, q = torch.randperm(6, generator=gen), torch.randperm(6, generator=gen)
    out = copy.deepcopy(model)
    with torch.no_grad():
        out.fc_in.weight.copy_(model.fc_in.weight[p])
        out.fc_in.bias.copy_(model.fc_in.bias[p])
        out.fc1.weight.copy_(model.fc1.weight[q][:, p])
        out.fc1.bias.copy_(model.fc1.bias[q])
        out.fc2.weight.copy_(model.fc2.weight[p][:, q])
        out.fc2.bias.copy_(model.fc2.bias[p])
        out.norm.weight.copy_(model.norm.weight[p])
        out.norm.bias.copy_(model.norm.bias[p])
        out.head.weight.copy_(model.head.weight[:, p])
        out.head.bias.copy_(model.head.bias)
    return out


def test_step_of_permuted_model_is_permuted_step_on_a_traced_graph():
    model = ResidualMLP()
    with torch.no_grad():  # a LayerNorm with non-trivial affine parameters
        model.norm.weight.normal_()
        model.norm.bias.normal_()
    twin = _permute_residual_mlp(model)
    x, y = regression_data(n=16)
    torch.testing.assert_close(twin(x), model(x), atol=1e-5, rtol=0)
    rule = random_rule(seed=5)
    opt = NGOptimizer(model.parameters(), model=model, graph="traced", rule=rule)
    twin_opt = NGOptimizer(twin.parameters(), model=twin, graph="traced", rule=rule)
    start = copy.deepcopy(model)
    for _ in range(3):
        _step(model, opt, x, y)
        _step(twin, twin_opt, x, y)
    expected = _permute_residual_mlp(model)
    for (name, p), q, s in zip(
        twin.named_parameters(), expected.parameters(), start.parameters()
    ):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=0, msg=name)
        assert not torch.equal(q, s)
