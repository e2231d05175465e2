"""NGConv and GraphBackbone: shapes, reprs, and equivariance to node relabelling."""

from __future__ import annotations

import pytest
import torch
from conftest import randomise
from torch_geometric.utils import scatter

from lopt.graph import edge_degree
from lopt.nn import GraphBackbone, NGConv

NUM_NODES, NUM_EDGES = 9, 30


def _graph(seed=0, node_in=5, edge_in=3):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(NUM_NODES, node_in, generator=gen)
    edge_index = torch.randint(0, NUM_NODES, (2, NUM_EDGES), generator=gen)
    edge_attr = torch.randn(edge_in, NUM_EDGES, generator=gen)
    return x, edge_index, edge_attr


def _relabel(x, edge_index, seed=1):
    """Node ``i`` becomes node ``perm[i]``."""
    perm = torch.randperm(NUM_NODES, generator=torch.Generator().manual_seed(seed))
    x_new = torch.empty_like(x)
    x_new[perm] = x
    return perm, x_new, perm[edge_index]


def test_ngconv_shapes_and_repr():
    conv = NGConv(node_dim=5, edge_dim=3, msg_dim=4)
    x, edge_index, edge_attr = _graph()
    h, e = conv(x, edge_index, edge_attr)
    assert h.shape == (NUM_NODES, 5) and e.shape == (3, NUM_EDGES)
    assert repr(conv) == "NGConv(node_dim=5, edge_dim=3, msg_dim=4)"
    assert repr(NGConv(6, 2)) == "NGConv(node_dim=6, edge_dim=2, msg_dim=2)"


def test_ngconv_film_starts_as_identity_modulation():
    conv = NGConv(node_dim=5, edge_dim=3)
    assert not conv.film.weight.any()
    assert conv.film.bias.tolist() == [1.0] * 3 + [0.0] * 3


def test_backbone_shapes_and_repr():
    backbone = GraphBackbone(node_in=5, edge_in=3, node_dim=6, edge_dim=4, num_layers=2)
    x, edge_index, edge_attr = _graph()
    h, e = backbone(x, edge_index, edge_attr)
    assert h.shape == (NUM_NODES, 6) and e.shape == (4, NUM_EDGES)
    assert repr(backbone) == (
        "GraphBackbone(node_in=5, edge_in=3, node_dim=6, edge_dim=4, num_layers=2)"
    )
    assert [repr(layer) for layer in backbone.layers] == [
        "NGConv(node_dim=6, edge_dim=4, msg_dim=4)"
    ] * 2


def test_backbone_edge_blocks_equal_concatenated_edge_inputs():
    backbone = randomise(GraphBackbone(5, 3, node_dim=6, edge_dim=4))
    x, edge_index, edge_attr = _graph()
    h, e = backbone(x, edge_index, edge_attr)
    h2, e2 = backbone(x, edge_index, (edge_attr[:1], edge_attr[1:]))
    torch.testing.assert_close(h, h2)
    torch.testing.assert_close(e, e2)


@pytest.mark.parametrize(
    "msg_dim", [None, 2, 5], ids=["msg=edge", "msg<edge", "msg>edge"]
)
@pytest.mark.parametrize("sort_dst", [False, True], ids=["unsorted", "dst-sorted"])
def test_ngconv_without_autograd_equals_autograd(sort_dst, msg_dim):
    """Without autograd NGConv reuses its edge buffers in place and sums
    dst-sorted edges by segments: the same result as the autograd path."""
    conv = randomise(NGConv(node_dim=5, edge_dim=3, msg_dim=msg_dim), seed=2, std=0.3)
    x, edge_index, edge_attr = _graph()
    if sort_dst:
        edge_index = edge_index[:, edge_index[1].argsort(stable=True)]
    degree = edge_degree(edge_index, NUM_NODES)
    assert degree.dst_sorted == sort_dst
    h, e = conv(x, edge_index, edge_attr)
    assert h.requires_grad and e.requires_grad
    with torch.no_grad():
        h2, e2 = conv(x, edge_index, edge_attr, degree)
    torch.testing.assert_close(h2, h)
    torch.testing.assert_close(e2, e)


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_ngconv_mean_is_pyg_mean(grad):
    """The aggregation divides by the cached degree: it must equal PyTorch
    Geometric's mean aggregation (over dst and over src)."""
    conv = NGConv(node_dim=5, edge_dim=3)
    _, edge_index, _ = _graph()
    edge_index = edge_index[:, edge_index[1].argsort(stable=True)]
    degree = edge_degree(edge_index, NUM_NODES)
    msg = torch.randn(conv.msg_dim, NUM_EDGES)
    with torch.set_grad_enabled(grad):
        for index, count, sort in (
            (edge_index[1], degree.fan_in, True),
            (edge_index[0], degree.fan_out, False),
        ):
            mean, std = conv._mean_std(msg, msg * msg, index, count, NUM_NODES, sort)
            moments = scatter(
                torch.cat([msg, msg * msg]),
                index,
                dim=1,
                dim_size=NUM_NODES,
                reduce="mean",
            ).T
            torch.testing.assert_close(mean, moments[:, : conv.msg_dim])
            variance = moments[:, conv.msg_dim :] - mean * mean
            torch.testing.assert_close(std, (variance.clamp(min=0) + 1e-5).sqrt())


def test_isolated_nodes_and_no_edges_stay_finite():
    conv = randomise(NGConv(node_dim=4, edge_dim=2))
    x = torch.randn(3, 4)
    h, e = conv(x, torch.zeros(2, 0, dtype=torch.long), torch.zeros(2, 0))
    assert bool(torch.isfinite(h).all()) and e.shape == (2, 0)


@pytest.mark.parametrize(
    "make",
    [
        lambda: NGConv(node_dim=5, edge_dim=3),
        lambda: GraphBackbone(5, 3, node_dim=6, edge_dim=4, num_layers=2),
        lambda: NGConv(node_dim=5, edge_dim=3, edge_mlp=False),
    ],
    ids=["ngconv", "backbone", "ngconv-lean"],
)
def test_relabelling_nodes_permutes_node_outputs_only(make):
    module = randomise(make(), seed=3, std=0.3)
    x, edge_index, edge_attr = _graph()
    h, e = module(x, edge_index, edge_attr)
    perm, x_p, edge_index_p = _relabel(x, edge_index)
    h_p, e_p = module(x_p, edge_index_p, edge_attr)
    torch.testing.assert_close(h_p[perm], h, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(e_p, e, atol=1e-5, rtol=1e-5)
    # Not trivially equal: the outputs depend on the graph structure.
    h_other, _ = module(x, edge_index.flip(0), edge_attr)
    assert not torch.allclose(h_other, h, atol=1e-3)


def test_reset_parameters_restores_initial_state():
    torch.manual_seed(0)
    backbone = GraphBackbone(5, 3, node_dim=6, edge_dim=4)
    randomise(backbone)
    backbone.reset_parameters()
    conv = backbone.layers[0]
    assert conv.film.bias.tolist() == [1.0] * 4 + [0.0] * 4
    assert not conv.edge_out.bias.any()
    assert float(conv.edge_out.weight.detach().std()) < 0.05


def test_lean_conv_updates_edges_by_node_terms_only():
    """``edge_mlp=False``: e' = e + W_s h'[src] + W_t h'[dst], no edge MLP."""
    conv = randomise(NGConv(node_dim=5, edge_dim=3, edge_mlp=False), seed=4)
    assert not hasattr(conv, "edge_lin") and "edge_mlp=False" in repr(conv)
    x, edge_index, edge_attr = _graph()
    h, e = conv(x, edge_index, edge_attr)
    src, dst = edge_index
    want = edge_attr + conv.edge_src(h)[src].T + conv.edge_dst(h)[dst].T
    torch.testing.assert_close(e, want)
