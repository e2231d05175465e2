"""Permuting the hidden neurons of a network relabels its neural graph, and
a graph network's outputs are invariant (graph-level) and equivariant
(node- and edge-level) to it: MLP, CNN, residual CNN with batch norm."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from weightspace_nets import (
    edge_match,
    mlp,
    old_of_new,
    perm,
    permute_state,
    permuted_graphs,
    symmetric_cases,
)

from lopt.weightspace import NeuralGraphGNN, to_graph

CASES = symmetric_cases()
NODE_KEYS = ("x", "node_role", "node_type", "node_act", "node_layer", "node_pos")
ATOL = 1e-5


def _graphs(name):
    return permuted_graphs(name, CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_permuted_network_computes_the_same_function(name):
    model, permuted, x, *_ = _graphs(name)
    torch.testing.assert_close(permuted(x), model(x))
    # The permutation is not the identity: the parameters did move.
    assert any(
        not torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), permuted.state_dict().values())
    )


@pytest.mark.parametrize("name", sorted(CASES))
def test_permuting_hidden_neurons_relabels_the_graph(name):
    _, _, _, old, new, relabel = _graphs(name)
    assert new.num_nodes == old.num_nodes
    for key in NODE_KEYS:
        assert torch.equal(new[key], old[key][relabel]), key
    match = edge_match(old, new, relabel)
    assert torch.equal(new.edge_attr, old.edge_attr[match])
    # The graphs themselves differ (the test is not vacuous).
    assert not torch.equal(new.x, old.x) or not torch.equal(
        new.edge_attr, old.edge_attr
    )


def _random_gnn(edge_features: int) -> NeuralGraphGNN:
    torch.manual_seed(0)
    model = NeuralGraphGNN(edge_features, graph_out=2, node_dim=8, edge_dim=4)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # far from the near-identity initialisation
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model.eval()


def _assert_invariant(gnn, old, new) -> None:
    with torch.no_grad():
        out_old, out_new = gnn(old), gnn(new)
    torch.testing.assert_close(out_new.graph, out_old.graph, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", sorted(CASES))
def test_gnn_is_invariant_and_equivariant_to_hidden_permutations(name):
    _, _, _, old, new, relabel = _graphs(name)
    gnn = _random_gnn(old.edge_attr.shape[1])
    _assert_invariant(gnn, old, new)
    with torch.no_grad():
        out_old, out_new = gnn(old), gnn(new)
    torch.testing.assert_close(out_new.node, out_old.node[relabel], atol=ATOL, rtol=0)
    match = edge_match(old, new, relabel)
    torch.testing.assert_close(out_new.edge, out_old.edge[match], atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_positional_index_on_hidden_neurons_breaks_invariance(name):
    """The control that shows the invariance test can fail: numbering the
    neurons by their node id (as a learned per-index embedding would) makes
    the graph-level output depend on the order of hidden neurons."""
    _, _, _, old, new, _ = _graphs(name)
    gnn = _random_gnn(old.edge_attr.shape[1])
    for graph in (old, new):
        graph.x = graph.x.clone()
        graph.x[:, 1] += torch.arange(graph.num_nodes, dtype=torch.float32)
    with pytest.raises(AssertionError):
        _assert_invariant(gnn, old, new)


@settings(max_examples=10, deadline=None)
@given(
    widths=st.lists(st.integers(1, 6), min_size=3, max_size=5),
    seed=st.integers(0, 2**16),
)
def test_any_mlp_permutation_relabels_the_graph_and_keeps_the_readout(widths, seed):
    model = mlp(widths=tuple(widths), seed=seed % 7)
    perms = [perm(w, seed + i) for i, w in enumerate(widths[1:-1])]
    spec = {}
    for i, p in enumerate(perms):
        spec[f"{2 * i}.weight"] = (p, spec.get(f"{2 * i}.weight", (None, None))[1])
        spec[f"{2 * i}.bias"] = (p, None)
        spec[f"{2 * i + 2}.weight"] = (None, p)
    permuted = copy.deepcopy(model)
    permuted.load_state_dict(permute_state(model.state_dict(), spec))
    groups = [(widths[0], None), *zip(widths[1:-1], perms), (widths[-1], None)]
    relabel = old_of_new(groups)
    old, new = to_graph(model), to_graph(permuted)
    for key in NODE_KEYS:
        assert torch.equal(new[key], old[key][relabel]), key
    match = edge_match(old, new, relabel)
    assert torch.equal(new.edge_attr, old.edge_attr[match])
    _assert_invariant(_random_gnn(1), old, new)
