"""NeuralGraph.from_module: the module's exact graph from its fx trace."""

from __future__ import annotations

import pytest
import torch
from conftest import mlp
from torch import nn

from lopt.graph import NeuralGraph, Unsupported


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
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 5, 3),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(20, 3),
    )


class TinyAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        q, k, v = self.qkv(x).split(8, dim=-1)
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y)


class TinyLSTM(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(4, 6, batch_first=True)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.lstm(x)[0])


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


@pytest.mark.parametrize("make", [TinyAttention, TinyLSTM])
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
