"""to_graph: structure, features, the parameter map back to the state_dict,
and the fallback to shape inference."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from weightspace_nets import cnn, mlp, residual_cnn

from lopt.weightspace import (
    ACTIVATIONS,
    LAYER_TYPES,
    NODE_FEATURES,
    NODE_ROLES,
    apply_graph_delta,
    from_graph_outputs,
    to_graph,
)

NETS = {"mlp": mlp, "cnn": cnn, "residual_cnn": residual_cnn}


def _floating(state):
    return {k: v for k, v in state.items() if v.is_floating_point()}


class _Branchy(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        if x.sum() > 0:
            return self.inner(x)
        return -self.inner(x)


@pytest.mark.parametrize("name", sorted(NETS))
def test_round_trip_gives_the_state_dict_exactly(name):
    model = NETS[name]()
    graph = to_graph(model)
    back = from_graph_outputs(graph)
    expected = _floating(model.state_dict())
    assert list(back) == list(expected)
    for key, value in expected.items():
        assert back[key].dtype == value.dtype
        assert torch.equal(back[key], value), key
    # Every entry has exactly one place.
    assert len(graph.param_node_pos.unique()) == len(graph.param_node_pos)
    assert len(graph.param_edge_pos.unique()) == len(graph.param_edge_pos)
    total = sum(v.numel() for v in expected.values())
    assert len(graph.param_node_pos) + len(graph.param_edge_pos) == total


def test_zero_delta_keeps_every_entry_and_an_edge_delta_moves_one_weight():
    model = residual_cnn()
    state = model.state_dict()
    graph = to_graph(model)
    same = apply_graph_delta(state, graph)
    assert list(same) == list(state)
    assert all(torch.equal(same[k], state[k]) for k in state)  # counters too
    # One tap of one conv edge: exactly that kernel entry moves.
    edge_delta = torch.zeros_like(graph.edge_attr)
    conv1 = LAYER_TYPES.index("conv")
    edge = int((graph.edge_type == conv1).nonzero()[5])
    centre = graph.edge_attr.shape[1] // 2
    edge_delta[edge, centre] = 1.0
    moved = apply_graph_delta(state, graph, edge_delta=edge_delta)
    changed = {k for k in state if not torch.equal(moved[k], state[k])}
    assert len(changed) == 1
    (key,) = changed
    assert int((moved[key] != state[key]).sum()) == 1


def test_mlp_structure_positions_and_activations():
    graph = to_graph(mlp(widths=(3, 6, 5, 2)))
    assert graph.num_nodes == 3 + 6 + 5 + 2
    assert graph.num_edges == 3 * 6 + 6 * 5 + 5 * 2
    assert graph.edge_attr.shape == (graph.num_edges, 1)
    roles = graph.node_role.tolist()
    assert roles == [0] * 3 + [1] * 11 + [2] * 2
    assert graph.node_pos.tolist() == [0, 1, 2] + [-1] * 11 + [0, 1]
    assert graph.node_layer.tolist() == [0] * 3 + [1] * 6 + [2] * 5 + [3] * 2
    acts = [ACTIVATIONS[i] for i in graph.node_act]
    assert acts == ["none"] * 3 + ["tanh"] * 6 + ["relu"] * 5 + ["none"] * 2
    # Biases are node features; input neurons have none.
    model = mlp(widths=(3, 6, 5, 2))
    assert torch.equal(graph.x[3:9, 0], model[0].bias)
    assert not graph.x[:3].any()


def test_conv_kernels_are_one_padded_edge_per_channel_pair():
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Conv2d(3, 4, 5), nn.Flatten(), nn.Linear(4, 2)
    )
    graph = to_graph(model, kernel_size=(5, 5))
    assert graph.kernel_shape == (5, 5)
    conv = graph.edge_type == LAYER_TYPES.index("conv")
    assert int(conv.sum()) == 2 * 3 + 3 * 4
    kernels = graph.edge_attr[conv].reshape(-1, 5, 5)
    # The 3x3 kernels sit in the centre of 5x5, zeros around them.
    first = kernels[: 2 * 3]
    assert torch.equal(first[:, 1:4, 1:4], model[0].weight.reshape(6, 3, 3))
    assert first.abs().sum() == first[:, 1:4, 1:4].abs().sum()
    assert torch.equal(kernels[6:], model[2].weight.reshape(12, 5, 5))
    # A linear weight is a 1x1 kernel: the centre tap.
    linear = graph.edge_attr[graph.edge_type == LAYER_TYPES.index("linear")]
    assert torch.equal(linear[:, 12], model[4].weight.reshape(-1))
    assert not linear[:, :12].any() and not linear[:, 13:].any()
    with pytest.raises(ValueError, match=r"kernel_size \(3, 3\) is smaller"):
        to_graph(model, kernel_size=(3, 3))


def test_linear_after_flatten_has_one_edge_per_channel_carrying_its_map():
    model = cnn()  # 5 channels of 2x2 flatten into Linear(20, 3)
    graph = to_graph(model)
    flat = graph.edge_type == LAYER_TYPES.index("flatten_linear")
    assert int(flat.sum()) == 5 * 3
    maps = graph.edge_attr[flat].reshape(3, 5, 3, 3)[..., :2, :2]  # 2x2 in 3x3
    assert torch.equal(maps.reshape(3, 20), model[6].weight)


def test_example_inputs_give_the_exact_shape_of_a_flattened_map():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 2 * 4, 3))
    guessed = to_graph(model)
    exact = to_graph(model, example_inputs=torch.zeros(1, 1, 4, 6))
    assert exact.kernel_shape == (3, 4)  # the 2x4 map needs 4 columns
    assert guessed.kernel_shape == (3, 8)  # 8 positions, not square: one row
    torch.testing.assert_close(
        from_graph_outputs(exact)["2.weight"], model[2].weight, rtol=0, atol=0
    )
    with pytest.raises(ValueError, match="example_inputs do not run through"):
        to_graph(model, example_inputs=torch.zeros(1, 3, 4, 6))


def test_batch_norm_is_a_layer_of_neurons_joined_one_to_one():
    model = cnn()
    graph = to_graph(model)
    bn = model[2]
    norm_nodes = graph.node_type == LAYER_TYPES.index("norm")
    assert int(norm_nodes.sum()) == 4
    norm_edges = graph.edge_type == LAYER_TYPES.index("norm")
    src, dst = graph.edge_index[:, norm_edges]
    assert (graph.node_type[src] == LAYER_TYPES.index("conv")).all()
    assert norm_nodes[dst].all() and len(dst.unique()) == 4
    centre = graph.edge_attr.shape[1] // 2
    assert torch.equal(graph.edge_attr[norm_edges, centre], bn.weight)
    x = graph.x[norm_nodes]
    columns = [NODE_FEATURES.index(c) for c in NODE_FEATURES]
    assert torch.equal(
        x[:, columns], torch.stack([bn.bias, bn.running_mean, bn.running_var], 1)
    )
    # relu comes before the norm in this network: it acts on the conv neurons.
    assert (graph.node_act[src] == ACTIVATIONS.index("relu")).all()


def test_residual_connections_are_identity_edges():
    model = residual_cnn(kernel=3)
    graph = to_graph(model)
    residual = graph.edge_type == LAYER_TYPES.index("residual")
    assert int(residual.sum()) == 4
    assert (graph.edge_tensor[residual] == -1).all()
    kernels = graph.edge_attr[residual].reshape(-1, 3, 3)
    identity = torch.zeros(3, 3)
    identity[1, 1] = 1.0
    assert (kernels == identity).all()
    src, dst = graph.edge_index[:, residual]
    # From bn0's neurons into bn2's, which absorb the sum.
    norm = LAYER_TYPES.index("norm")
    assert (graph.node_type[src] == norm).all() and (graph.node_type[dst] == norm).all()
    assert (graph.node_layer[dst] - graph.node_layer[src] == 4).all()
    assert (graph.node_act[dst] == ACTIVATIONS.index("relu")).all()
    outputs = graph.node_role == NODE_ROLES.index("output")
    assert graph.node_pos[outputs].tolist() == [0, 1, 2]


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_untraceable_module_falls_back_to_the_same_graph_with_a_warning(name):
    inner = NETS[name]()
    with pytest.warns(UserWarning, match="falls back to shape inference.*fx"):
        fallback = to_graph(_Branchy(inner))
    traced = to_graph(inner)
    for key in ("x", "edge_index", "edge_attr", "node_role", "node_type", "node_pos"):
        assert torch.equal(fallback[key], traced[key]), key
    assert (fallback.node_act == ACTIVATIONS.index("unknown")).all()
    back = from_graph_outputs(fallback)
    for key, value in _floating(_Branchy(inner).state_dict()).items():
        assert torch.equal(back[key], value)


def test_unsupported_module_warns_naming_it_and_keeps_every_parameter():
    model = nn.Sequential(nn.Linear(4, 8), nn.TransformerEncoderLayer(8, 2, 16))
    with pytest.warns(UserWarning, match="TransformerEncoderLayer is not supported"):
        graph = to_graph(model)
    back = from_graph_outputs(graph)
    for key, value in _floating(model.state_dict()).items():
        assert torch.equal(back[key], value), key


def test_state_dict_overrides_the_weights_and_bad_ones_are_named():
    model, other = mlp(seed=0), mlp(seed=1)
    graph = to_graph(model, other.state_dict())
    assert torch.equal(from_graph_outputs(graph)["0.weight"], other[0].weight)
    bad = dict(other.state_dict())
    bad["9.weight"] = bad.pop("4.weight")
    with pytest.raises(ValueError, match=r"missing keys \['4.weight'\].*'9.weight'"):
        to_graph(model, bad)
    bad = dict(other.state_dict(), **{"0.bias": torch.zeros(7)})
    with pytest.raises(ValueError, match=r"'0.bias' has shape \(7,\).*\(6,\)"):
        to_graph(model, bad)


def test_outputs_of_the_wrong_shape_are_refused():
    graph = to_graph(mlp())
    with pytest.raises(ValueError, match="node_values must have the shape of data.x"):
        from_graph_outputs(graph, node_values=torch.zeros(2, 3))
    width = math.prod(graph.kernel_shape)
    with pytest.raises(ValueError, match="edge_values"):
        from_graph_outputs(graph, edge_values=torch.zeros(graph.num_edges, width + 1))
