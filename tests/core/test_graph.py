"""NeuralGraph: shape inference, counts, roles and the flat layout."""

from __future__ import annotations

import pytest
import torch
from conftest import mlp
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lopt import NeuralGraph
from lopt.graph import EDGE_ATTR_DIM, NODE_ROLES, STANDALONE_SLOT


def _cnn() -> nn.Sequential:
    # 10x10 -> conv 8x8 -> pool 4x4 -> conv 2x2: the linear sees 6 * 2 * 2 inputs.
    return nn.Sequential(
        nn.Conv2d(2, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3),
        nn.BatchNorm2d(6),
        nn.Flatten(),
        nn.Linear(24, 5),
    )


class _Scalars(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 2)
        self.temperature = nn.Parameter(torch.tensor(1.5))
        self.extra = nn.Parameter(torch.randn(7))  # matches no layer width


MODELS = {
    "mlp": lambda: mlp(),
    "cnn": _cnn,
    "transformer": lambda: nn.TransformerEncoderLayer(
        d_model=8, nhead=2, dim_feedforward=16
    ),
    "lstm": lambda: nn.LSTM(3, 5, num_layers=2),
    "embedding": lambda: nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 3)),
    "conv3d": lambda: nn.Conv3d(2, 3, (2, 3, 3)),
    "scalars": _Scalars,
}


def _role(graph: NeuralGraph) -> list[str]:
    return [NODE_ROLES[i] for i in graph.node_attr[:, : len(NODE_ROLES)].argmax(1)]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_scalar_is_one_edge_or_one_slot(name):
    params = list(MODELS[name]().parameters())
    graph = NeuralGraph.from_parameters(params)
    total = sum(p.numel() for p in params)
    assert graph.num_edges + graph.num_slots == total
    assert graph.num_scalars == total
    # Every parameter tensor appears exactly once in graph order.
    assert sorted(graph.tensor_order) == list(range(len(params)))
    counts = torch.bincount(graph.tensor_id, minlength=len(params))
    assert counts.tolist() == [p.numel() for p in params]
    # Edges only from tensors with two or more dims, slots only from the rest.
    edge_tensors = set(graph.tensor_id[: graph.num_edges].tolist())
    assert all(params[i].dim() >= 2 for i in edge_tensors)
    slot_tensors = set(graph.tensor_id.tolist()) - edge_tensors
    assert all(params[i].dim() < 2 for i in slot_tensors)
    assert int(graph.edge_index.max()) < graph.num_nodes
    assert int(graph.slot_node.max()) < graph.num_nodes
    assert graph.edge_attr.shape == (EDGE_ATTR_DIM, graph.num_edges)


def test_mlp_counts_and_roles():
    graph = NeuralGraph.from_parameters(mlp(sizes=(4, 6, 3)).parameters())
    assert (graph.num_nodes, graph.num_edges, graph.num_slots) == (13, 42, 9)
    assert _role(graph) == ["input"] * 4 + ["hidden"] * 6 + ["output"] * 3
    depth = graph.node_attr[:, -1]
    assert depth.tolist() == [0.0] * 4 + [0.5] * 6 + [1.0] * 3
    # The second layer reads the first layer's outputs.
    second = graph.edge_index[:, 24:]
    assert set(second[0].tolist()) == set(range(4, 10))
    assert set(second[1].tolist()) == set(range(10, 13))
    # Biases are slot type 0 of their layer's nodes.
    assert graph.slot_node.tolist() == list(range(4, 13))
    assert graph.slot_type.tolist() == [0] * 9


def test_cnn_counts_slots_and_flatten():
    model = _cnn()
    params = list(model.parameters())
    graph = NeuralGraph.from_parameters(params)
    assert graph.num_nodes == 2 + 4 + 6 + 5
    assert graph.num_edges == 2 * 4 * 9 + 4 * 6 * 9 + 24 * 5
    assert graph.num_slots == 4 + 4 + 4 + 6 + 6 + 6 + 5
    # conv bias, BN weight, BN bias are slot types 0, 1, 2 of the conv's nodes.
    assert graph.slot_type[:12].tolist() == [0] * 4 + [1] * 4 + [2] * 4
    conv1_nodes = torch.arange(2, 6)
    assert graph.slot_node[:12].tolist() == conv1_nodes.repeat(3).tolist()
    # Kernel taps are flagged and carry their offset; the linear's are not.
    conv_attr, lin_attr = graph.edge_attr[:, :288], graph.edge_attr[:, 288:]
    assert bool((conv_attr[-1] == 1).all()) and bool((lin_attr == 0).all())
    assert sorted(set(conv_attr[0].tolist())) == [-1.0, 0.0, 1.0]
    # The linear after flatten connects each input feature to the channel node
    # it was flattened from: feature i of 24 comes from channel i // 4.
    conv2_nodes = graph.edge_index[1, 72:288].unique()
    assert conv2_nodes.tolist() == list(range(6, 12))
    lin_src = graph.edge_index[0, 288:].view(5, 24)
    expected = conv2_nodes.repeat_interleave(4)
    assert all(torch.equal(row, expected) for row in lin_src)
    assert graph.edge_index[1, 288:].unique().tolist() == list(range(12, 17))
    assert _role(graph)[12:] == ["output"] * 5


def test_conv3d_edges_and_offsets():
    graph = NeuralGraph.from_parameters(nn.Conv3d(2, 3, (2, 3, 3)).parameters())
    assert (graph.num_nodes, graph.num_edges, graph.num_slots) == (5, 108, 3)
    offsets = graph.edge_attr[:3, :18]
    # 18 taps of one (2, 3, 3) kernel: all distinct offsets, within [-1, 1].
    assert len({tuple(c) for c in offsets.T.tolist()}) == 18
    assert float(offsets.abs().max()) <= 1.0


def test_scalars_and_unmatched_vectors_are_standalone():
    m = _Scalars()
    params = [m.linear.weight, m.linear.bias, m.temperature, m.extra]
    graph = NeuralGraph.from_parameters(params)
    # Linear(3, 2): 3 inputs + 2 outputs; scalar: 1 node; extra: 7 nodes.
    assert graph.num_nodes == 5 + 1 + 7
    assert _role(graph) == ["input"] * 3 + ["output"] * 2 + ["standalone"] * 8
    assert graph.slot_type.tolist() == [0, 0] + [STANDALONE_SLOT] * 8
    assert graph.slot_node.tolist() == [3, 4] + list(range(5, 13))


def test_transformer_and_lstm_have_no_crash_and_all_slots_attached():
    for name in ("transformer", "lstm"):
        graph = NeuralGraph.from_parameters(MODELS[name]().parameters())
        assert graph.num_slots > 0 and graph.num_edges > 0
        # Biases and norms of these models all match a layer: no standalone nodes.
        assert "standalone" not in _role(graph)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_flatten_unflatten_round_trip(name):
    params = [p.detach() for p in MODELS[name]().parameters()]
    graph = NeuralGraph.from_parameters(params)
    flat = graph.flatten(params)
    assert flat.shape == (graph.num_scalars,) and flat.dtype == torch.float32
    back = graph.unflatten(flat)
    assert len(back) == len(params)
    assert all(torch.equal(a, b) for a, b in zip(back, params))
    # Channel-major (K, P) values unflatten to (K, *shape) per parameter.
    stacked = torch.stack([flat, 2 * flat, -flat])
    for k, scale in enumerate((1, 2, -1)):
        per_param = graph.unflatten(stacked)
        assert all(
            torch.equal(a[k], scale * b) and a.shape == (3, *b.shape)
            for a, b in zip(per_param, params)
        )


def test_flatten_is_float32_for_low_precision_params():
    params = [torch.randn(3, 2, dtype=torch.bfloat16), torch.randn(3).half()]
    graph = NeuralGraph.from_parameters(params)
    flat = graph.flatten(params)
    assert flat.dtype == torch.float32
    assert torch.equal(graph.unflatten(flat)[0], params[0].float())


def test_graph_order_puts_edges_first():
    shapes = [(3,), (4, 3), (4,), (2, 4)]
    graph = NeuralGraph.from_shapes(shapes)
    # (3,) comes first in parameter order but matches no layer: standalone.
    assert graph.tensor_order == (1, 3, 0, 2)
    edges, slots = graph.split_scalars(torch.arange(graph.num_scalars))
    assert edges.tolist() == list(range(20)) and slots.tolist() == list(range(20, 27))


def test_repr():
    graph = NeuralGraph.from_parameters(mlp(sizes=(4, 6, 3)).parameters())
    assert repr(graph) == "NeuralGraph(tensors=4, nodes=13, edges=42, slots=9)"


def test_to_keeps_structure():
    graph = NeuralGraph.from_parameters(mlp().parameters())
    moved = graph.to("cpu")
    assert repr(moved) == repr(graph)
    assert torch.equal(moved.edge_index, graph.edge_index)


_shape = st.lists(st.integers(1, 4), min_size=0, max_size=4).map(tuple)


@settings(max_examples=40, deadline=None)
@given(st.lists(_shape, min_size=1, max_size=6))
def test_any_shapes_build_and_round_trip(shapes):
    graph = NeuralGraph.from_shapes(shapes)
    numel = [torch.Size(s).numel() for s in shapes]
    assert graph.num_edges + graph.num_slots == sum(numel)
    params = [torch.arange(float(n)).view(s) for n, s in zip(numel, shapes)]
    back = graph.unflatten(graph.flatten(params))
    assert all(torch.equal(a, b) for a, b in zip(back, params))
