"""Weight-space models and their input features: NG-GNN and NG-T with every
feature on and off are invariant (graph) and equivariant (nodes, edges) to
hidden-neuron permutations; positional and activation embeddings see what
they must; probes are the networks' activations and learn; batching changes
nothing."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch_geometric.data import Batch
from weightspace_nets import (
    cnn,
    edge_match,
    mlp,
    permuted_graphs,
    siren,
    symmetric_cases,
)

from lopt.weightspace import (
    NeuralGraphFeaturizer,
    NeuralGraphGNN,
    NeuralGraphTransformer,
    RandomFourierFeatures,
    RelationalAttentionLayer,
    WeightSpaceConfig,
    WeightSpaceReadout,
    probe_activations,
    to_graph,
)
from lopt.weightspace.graph.data import NODE_ROLES
from lopt.weightspace.models.readout import output_neurons
from lopt.weightspace.splits import WeightSpaceData

CASES = symmetric_cases()
MODELS = {"gnn": NeuralGraphGNN, "transformer": NeuralGraphTransformer}
ATOL = 1e-5
#: Every optional input off (Fourier features included: their default is on
#: for graphs of scalar weights).
OFF = dict(
    positional=False,
    activation_embedding=False,
    layer_embedding=False,
    fourier_features=0,
)


def _config(flags: str, probe_shape=()) -> WeightSpaceConfig:
    if flags == "off":
        return WeightSpaceConfig(**OFF)
    return WeightSpaceConfig(
        fourier_features=3,
        fourier_scale=0.5,
        probes=4,
        probe_shape=probe_shape,
        sign_canonical=True,
        neuron_statistics=True,
        layer_normalised_edges=True,
    )


ALL_POOLINGS = ("mean", "std", "max", "output", "depth")


def _model(
    kind: str,
    edge_features: int,
    config: WeightSpaceConfig,
    seed=0,
    pooling=("mean",),
):
    torch.manual_seed(seed)
    model = MODELS[kind](
        edge_features,
        graph_out=2,
        node_dim=8,
        edge_dim=4,
        config=config,
        pooling=pooling,
        output_neurons=16,
    )
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # far from the initialisation (LayerNorms included)
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model.eval()


@pytest.mark.parametrize("flags", ["on", "off"])
@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("name", sorted(CASES))
def test_models_are_invariant_and_equivariant_to_hidden_permutations(name, kind, flags):
    model, permuted, x, old, new, relabel = permuted_graphs(name, CASES)
    # Every feature on also pools the readout every way (std and max too).
    pooling = ALL_POOLINGS if flags == "on" else ("mean",)
    net = _model(kind, old.edge_attr.shape[1], _config(flags, x.shape[1:]), 0, pooling)
    with torch.no_grad():
        out_old, out_new = net(old, model), net(new, permuted)
    torch.testing.assert_close(out_new.graph, out_old.graph, atol=ATOL, rtol=0)
    torch.testing.assert_close(out_new.node, out_old.node[relabel], atol=ATOL, rtol=0)
    match = edge_match(old, new, relabel)
    torch.testing.assert_close(out_new.edge, out_old.edge[match], atol=ATOL, rtol=0)
    # Not vacuous: the node outputs do differ from node to node.
    assert out_old.node.std(0).min() > 1e-4


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_positional_embeddings_see_a_permutation_of_input_neurons(kind):
    """Swapping an MLP's inputs relabels input neurons only: a model that
    knows their positions tells the two apart, one that does not cannot. The
    hidden and output neurons keep their ids: compare their outputs (graph
    means shrink the difference)."""
    model = mlp()
    swapped = copy.deepcopy(model)
    with torch.no_grad():
        swapped[0].weight.copy_(model[0].weight[:, [2, 0, 1]])
    old, new = to_graph(model), to_graph(swapped)
    for positional, same in ((False, True), (True, False)):
        config = WeightSpaceConfig(positional=positional)
        net = _model(kind, 1, config)
        with torch.no_grad():
            a, b = net(old).node[3:], net(new).node[3:]
        assert torch.allclose(a, b, atol=ATOL) == same, positional


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_activation_embeddings_tell_activations_apart(kind):
    tanh = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    relu = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    relu.load_state_dict(tanh.state_dict())
    a, b = to_graph(tanh), to_graph(relu)
    for embed, same in ((False, True), (True, False)):
        net = _model(kind, 1, WeightSpaceConfig(activation_embedding=embed))
        with torch.no_grad():
            same_out = torch.allclose(net(a).graph, net(b).graph, atol=ATOL)
        assert same_out == same, embed


@pytest.mark.parametrize("name", sorted(CASES))
def test_probe_activations_permute_with_hidden_neurons(name):
    model, permuted, x, old, new, relabel = permuted_graphs(name, CASES)
    before = probe_activations(model, old, x)
    after = probe_activations(permuted, new, x)
    torch.testing.assert_close(after, before[relabel], atol=ATOL, rtol=0)
    # Output neurons hold the network's outputs.
    outputs = old.node_role == 2
    torch.testing.assert_close(before[outputs].T, model(x), atol=ATOL, rtol=0)
    assert before.abs().sum(0).min() > 0


def test_probe_activations_are_the_networks_own_and_batch_under_vmap():
    model = mlp(widths=(3, 6, 5, 2))
    probes = torch.randn(5, 3)
    graph = to_graph(model)
    values = probe_activations(model, graph, probes)
    torch.testing.assert_close(values[:3].T, probes)  # inputs: the probes
    torch.testing.assert_close(values[3:9].T, torch.tanh(model[0](probes)))
    other = mlp(widths=(3, 6, 5, 2), seed=1)
    batch = Batch.from_data_list([graph, to_graph(other)])
    shared = probe_activations(model, batch, probes)  # one architecture: vmap
    each = probe_activations([model, other], batch, probes)
    torch.testing.assert_close(shared, each)
    torch.testing.assert_close(shared[graph.num_nodes :, :].T[:, -2:], other(probes))
    # The CNN's neurons: per-channel means over positions.
    net = cnn()
    x = torch.randn(3, 2, 6, 6)
    values = probe_activations(net, to_graph(net), x)
    torch.testing.assert_close(values[2:6].T, torch.relu(net[0](x)).mean((2, 3)))


def test_siren_probes_run_its_own_forward_and_learn_under_vmap():
    """w0 lives in the forward, not in the weights: probes read it from the
    module. A batch of SIRENs (one architecture) runs under vmap."""
    nets = [siren(seed=s) for s in range(3)]
    graphs = [to_graph(n) for n in nets]
    coords = torch.rand(6, 2) * 2 - 1
    values = probe_activations(nets[0], graphs[0], coords)
    first = torch.sin(30.0 * nets[0].layers[0](coords))
    torch.testing.assert_close(values[2:10].T, first)
    torch.testing.assert_close(values[-1:].T, nets[0](coords))
    config = WeightSpaceConfig(probes=5, probe_shape=(2,))
    model = NeuralGraphTransformer(1, config=config)
    out = model(Batch.from_data_list(graphs), nets[0])
    out.graph.sum().backward()
    assert model.features.probe_inputs.grad.abs().sum() > 0


def test_probe_errors_name_the_problem():
    model = mlp()
    graph = to_graph(model)
    with pytest.raises(ValueError, match="does not trace to the graph's network"):
        probe_activations(cnn(), graph, torch.randn(2, 3))
    inferred = to_graph(model, trace=False)
    assert inferred.fx_values == ()
    with pytest.raises(ValueError, match="built by shape inference"):
        probe_activations(model, inferred, torch.randn(2, 3))
    batch = Batch.from_data_list([graph, to_graph(mlp(widths=(3, 4, 2)))])
    with pytest.raises(ValueError, match="different architectures"):
        probe_activations(model, batch, torch.randn(2, 3))
    net = NeuralGraphGNN(1, config=WeightSpaceConfig(probes=2, probe_shape=(3,)))
    with pytest.raises(ValueError, match="pass the networks"):
        net(graph)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_learned_probes_receive_gradients(kind):
    models = [mlp(seed=0), mlp(seed=1)]
    batch = Batch.from_data_list([to_graph(m) for m in models])
    config = WeightSpaceConfig(probes=4, probe_shape=(3,))
    for networks in (models[0], models):  # shared architecture, then one each
        net = MODELS[kind](1, config=config)
        net(batch, networks).graph.square().sum().backward()
        grad = net.features.probe_inputs.grad
        assert grad is not None and grad.abs().sum() > 0


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_a_batch_gives_each_graph_its_own_outputs(kind):
    nets = [mlp(widths=(3, 7, 2)), cnn(), symmetric_cases()["residual_cnn"][0]]
    graphs = [to_graph(m, kernel_size=(3, 3)) for m in nets]
    config = WeightSpaceConfig(fourier_features=2)
    model = _model(kind, 9, config, pooling=ALL_POOLINGS)
    batch = Batch.from_data_list(graphs)
    with torch.no_grad():
        together = model(batch)
        alone = [model(g) for g in graphs]
    torch.testing.assert_close(together.graph, torch.cat([a.graph for a in alone]))
    torch.testing.assert_close(together.node, torch.cat([a.node for a in alone]))
    torch.testing.assert_close(together.edge, torch.cat([a.edge for a in alone]))
    # With probes: three MLPs of different widths, one module each.
    mlps = [mlp(widths=w) for w in ((3, 4, 2), (3, 6, 5, 2), (3, 2, 2))]
    config = WeightSpaceConfig(probes=3, probe_shape=(3,))
    model = _model(kind, 1, config)
    graphs = [to_graph(m) for m in mlps]
    with torch.no_grad():
        together = model(Batch.from_data_list(graphs), mlps)
        alone = torch.cat([model(g, m).graph for g, m in zip(graphs, mlps)])
    torch.testing.assert_close(together.graph, alone)


def test_fourier_features_shape_values_and_seed():
    rff = RandomFourierFeatures(4, scale=2.0, seed=3)
    w = torch.randn(5, 7)
    out = rff(w)
    assert out.shape == (5, 7 * 9) == (5, rff.out_features(7))
    per = out.reshape(5, 7, 9)
    torch.testing.assert_close(per[..., 0], w)
    angle = 2 * torch.pi * w[..., None] * rff.frequencies
    torch.testing.assert_close(per[..., 1:5], angle.sin())
    torch.testing.assert_close(per[..., 5:], angle.cos())
    same = RandomFourierFeatures(4, scale=2.0, seed=3)
    assert torch.equal(same.frequencies, rff.frequencies)
    assert not torch.equal(
        RandomFourierFeatures(4, seed=4).frequencies, rff.frequencies
    )
    assert "frequencies" in rff.state_dict() and not list(rff.parameters())
    # Conv kernels: each tap of each edge gets its own features.
    featurizer = NeuralGraphFeaturizer(
        9, WeightSpaceConfig(**{**OFF, "fourier_features": 4})
    )
    graph = to_graph(cnn(), kernel_size=(3, 3))
    nodes, edges = featurizer(graph)
    assert edges.shape == (graph.num_edges, 9 * 9)
    assert (
        nodes.shape
        == (graph.num_nodes, 3 * 9 + 4)
        == (graph.num_nodes, featurizer.node_in)
    )


def test_featurizer_widths_follow_the_flags_and_hidden_neurons_get_no_position():
    graph = to_graph(mlp())
    base = NeuralGraphFeaturizer(1, WeightSpaceConfig(**OFF))
    assert (base.node_in, base.edge_in) == (3 + 4, 1)
    full = NeuralGraphFeaturizer(
        1, WeightSpaceConfig(embedding_dim=5, fourier_features=0)
    )
    assert (full.node_in, full.edge_in) == (3 + 4 + 3 * 5, 1 + 5)
    nodes, edges = full(graph)
    assert nodes.shape == (graph.num_nodes, full.node_in)
    position = nodes[:, -5:]
    hidden = graph.node_pos == -1
    assert not position[hidden].any() and position[~hidden].abs().sum(1).min() > 0
    # Input position 0 and output position 0 are different rows.
    assert not torch.equal(position[0], position[-2])
    with pytest.raises(ValueError, match="beyond max_positions=2"):
        NeuralGraphFeaturizer(1, WeightSpaceConfig(max_positions=2))(graph)


def test_bad_arguments_raise():
    for kwargs, message in (
        (dict(max_positions=0), "Invalid max_positions: 0"),
        (dict(embedding_dim=0), "Invalid embedding_dim: 0"),
        (dict(fourier_features=-1), "Invalid fourier_features: -1"),
        (dict(fourier_scale=0.0), "Invalid fourier_scale: 0.0"),
        (dict(probes=-2), "Invalid probes: -2"),
        (dict(probes=2), "probes need probe_shape"),
        (dict(input_clip=0.0), "Invalid input_clip: 0.0"),
        (dict(statistics_scaling="rank"), "Invalid statistics_scaling: 'rank'"),
        (dict(statistics_quantiles=1), "Invalid statistics_quantiles: 1"),
    ):
        with pytest.raises(ValueError, match=message):
            WeightSpaceConfig(**kwargs)
    with pytest.raises(ValueError, match="Invalid num_heads: 3"):
        NeuralGraphTransformer(1, node_dim=8, num_heads=3)
    with pytest.raises(ValueError, match="Invalid edge_features: 0"):
        NeuralGraphTransformer(0)
    with pytest.raises(ValueError, match="Invalid graph_out: 0"):
        NeuralGraphGNN(1, graph_out=0)
    for pooling in ((), ("mean", "median"), ("max", "max")):
        with pytest.raises(ValueError, match="Invalid pooling"):
            NeuralGraphGNN(1, pooling=pooling)
    with pytest.raises(ValueError, match="graphs have 1 edge features, the model"):
        NeuralGraphTransformer(9)(to_graph(mlp()))
    with pytest.raises(ValueError, match="Invalid output_neurons: 0"):
        NeuralGraphGNN(1, pooling=("output",), output_neurons=0)
    two_outputs = to_graph(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)))
    with pytest.raises(ValueError, match="output neuron at position 1; the readout"):
        NeuralGraphGNN(1, pooling=("output",), output_neurons=1)(two_outputs)


def test_reprs():
    assert repr(NeuralGraphGNN(9, graph_out=3)) == (
        "NeuralGraphGNN(edge_features=9, graph_out=3, node_dim=32, edge_dim=8, "
        "num_layers=3)"
    )
    assert repr(NeuralGraphTransformer(9, num_heads=2)) == (
        "NeuralGraphTransformer(edge_features=9, graph_out=1, node_dim=32, "
        "edge_dim=8, num_layers=2, num_heads=2)"
    )
    assert repr(RelationalAttentionLayer(8, 4, 2)) == (
        "RelationalAttentionLayer(node_dim=8, edge_dim=4, num_heads=2)"
    )
    assert repr(RandomFourierFeatures(4, 0.5, 1)) == (
        "RandomFourierFeatures(4, scale=0.5, seed=1)"
    )
    featurizer = NeuralGraphFeaturizer(1, WeightSpaceConfig(**OFF))
    assert repr(featurizer).startswith(
        "NeuralGraphFeaturizer(edge_features=1, node_in=7, edge_in=1, "
        "WeightSpaceConfig(positional=False"
    )
    assert isinstance(NeuralGraphGNN(1).readout, WeightSpaceReadout)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_a_diverged_network_gets_finite_outputs_and_leaves_the_others_alone(kind):
    # A zoo can hold a run that diverged (weights of 1e10, as in cnn_wild's
    # test split): unclamped, it overflows float32 inside the model.
    torch.manual_seed(0)
    nets = [mlp(widths=(3, 6, 6, 2)) for _ in range(5)]
    broken = copy.deepcopy(nets[0])
    with torch.no_grad():
        for p in broken.parameters():
            p.mul_(1e10)
    graphs = [to_graph(m) for m in nets]
    outs = {}
    for clip in (100.0, None):
        model = _model(kind, 1, WeightSpaceConfig(input_clip=clip))
        model.features.fit_input_scales(Batch.from_data_list(graphs))
        with torch.no_grad():
            typical = model(Batch.from_data_list(graphs)).graph
            mixed = model(Batch.from_data_list([to_graph(broken), *graphs])).graph
        outs[clip] = typical, mixed
    typical, mixed = outs[100.0]
    assert torch.isfinite(mixed).all()
    torch.testing.assert_close(mixed[1:], typical)
    # Typical networks are untouched by the clamp ...
    torch.testing.assert_close(outs[None][0], typical)
    # ... and it is what keeps the diverged one in range: unclamped it is
    # non-finite (NG-GNN) or astronomically large (NG-T's LayerNorms).
    assert mixed[0].abs().max() < 1e5
    unclamped = outs[None][1][0]
    assert not torch.isfinite(unclamped).all() or unclamped.abs().max() > 1e6


def _dense_relational_attention(layer, h, e, edge_index):
    """The formula of :class:`RelationalAttentionLayer` for one graph, with
    the dense (M, M, 2F + 2) pair tensor written out."""
    m, d = len(h), layer.edge_dim
    heads, width = layer.num_heads, layer.node_dim // layer.num_heads
    pairs = torch.zeros(m, m, 2 * d + 2)
    for (i, j), emb in zip(edge_index.T.tolist(), e):
        pairs[j, i, :d] += emb  # fan-in of j
        pairs[j, i, 2 * d] += 1
        pairs[i, j, d : 2 * d] += emb  # fan-out of i
        pairs[i, j, 2 * d + 1] += 1
    q, k, v = layer.qkv(layer.node_norm(h)).view(m, 3, heads, width).unbind(1)
    pk = layer.pair_key(pairs).view(m, m, heads, width)
    pv = layer.pair_value(pairs).view(m, m, heads, width)
    logits = (q[:, None] * (k[None] + pk)).sum(-1) / width**0.5  # (j, i, h)
    attn = logits.softmax(dim=1)
    mixed = (attn[..., None] * (v[None] + pv)).sum(1).reshape(m, -1)
    h = h + layer.out(mixed)
    h = h + layer.mlp(layer.mlp_norm(h))
    src, dst = edge_index
    update = layer.edge_self(layer.edge_norm(e)) + layer.edge_src(h)[src]
    return h, e + layer.edge_out(nn.functional.silu(update + layer.edge_dst(h)[dst]))


def test_relational_attention_equals_its_dense_formula_per_graph():
    torch.manual_seed(0)
    graphs = [to_graph(mlp(widths=(3, 7, 2))), to_graph(mlp(widths=(3, 5, 5, 2)))]
    # A parallel edge (two weights between one pair) is summed in the pair.
    graphs[1].edge_index = torch.cat(
        [graphs[1].edge_index, graphs[1].edge_index[:, :2]], 1
    )
    layer = RelationalAttentionLayer(8, 4, 2)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    hs = [torch.randn(g.num_nodes, 8) for g in graphs]
    es = [torch.randn(g.edge_index.shape[1], 4) for g in graphs]
    offsets = [0, graphs[0].num_nodes]
    edge_index = torch.cat([g.edge_index + o for g, o in zip(graphs, offsets)], 1)
    batch = torch.cat([torch.full((g.num_nodes,), i) for i, g in enumerate(graphs)])
    with torch.no_grad():
        h, e = layer(torch.cat(hs), torch.cat(es), edge_index, batch, 2)
        ref = [
            _dense_relational_attention(layer, *a)
            for a in zip(hs, es, [g.edge_index for g in graphs])
        ]
    torch.testing.assert_close(h, torch.cat([r[0] for r in ref]), atol=1e-5, rtol=0)
    torch.testing.assert_close(e, torch.cat([r[1] for r in ref]), atol=1e-5, rtol=0)


def test_pool_gives_each_group_its_mean_std_and_max():
    from lopt.weightspace.models.readout import pool

    values = torch.randn(7, 3)
    index = torch.tensor([0, 2, 0, 2, 2, 0, 0])  # group 1 is empty
    for how, ref in (
        ("mean", lambda v: v.mean(0)),
        ("std", lambda v: v.std(0, unbiased=False)),
        ("max", lambda v: v.amax(0)),
    ):
        out = pool(values, index, 3, how)
        for g in (0, 2):
            torch.testing.assert_close(
                out[g], ref(values[index == g]), atol=1e-3, rtol=0
            )
        assert out[1].abs().max() < 1e-2  # empty: zeros (std: sqrt of its eps)
    with pytest.raises(ValueError, match="Invalid pooling: 'median'"):
        pool(values, index, 3, "median")


def test_output_readout_reads_output_neurons_in_position_order():
    """Two graphs in one batch, with 2 and 3 output neurons; the readout
    table has 3 slots: each graph's output embeddings in position order, and
    zeros where the first graph has no third output."""
    graphs = [
        to_graph(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, w)))
        for w in (2, 3)
    ]
    batch = Batch.from_data_list(graphs)
    h = torch.randn(batch.num_nodes, 5)
    table = output_neurons(h, batch, batch.batch, 2, 3).view(2, 3, 5)
    output = NODE_ROLES.index("output")
    for g in range(2):
        mine = (batch.batch == g) & (batch.node_role == output)
        order = batch.node_pos[mine].argsort()
        expected = h[mine][order]
        torch.testing.assert_close(table[g, : len(expected)], expected)
    assert torch.equal(table[0, 2], torch.zeros(5))
    # A data set reports the readout's size: its widest output layer.
    data = WeightSpaceData.from_modules(
        [nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, w)) for w in (2, 3)]
    )
    assert data.output_neurons == 3


def _flip_signs(net: nn.Module, layers: list[tuple[nn.Module, nn.Module]], seed=0):
    """Negate a random half of the hidden neurons of each ``(layer, next)``
    pair: their weights and bias in ``layer``, their column in ``next``. For
    an odd activation the function does not change."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer, nxt in layers:
            n = layer.weight.shape[0]
            s = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
            layer.weight.mul_(s.view(-1, *[1] * (layer.weight.dim() - 1)))
            layer.bias.mul_(s)
            nxt.weight.mul_(s.view(1, -1, *[1] * (nxt.weight.dim() - 2)))
    return net


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("case", ["siren", "tanh_mlp", "tanh_cnn"])
def test_sign_canonical_models_ignore_sign_flips_of_odd_neurons(kind, case):
    torch.manual_seed(0)
    if case == "siren":
        net, x = siren(), torch.rand(5, 2) * 2 - 1
        pairs = [(net.layers[0], net.layers[1]), (net.layers[1], net.out)]
    elif case == "tanh_mlp":
        net = nn.Sequential(
            nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2)
        )
        x, pairs = torch.randn(5, 3), [(net[0], net[2]), (net[2], net[4])]
    else:
        net = nn.Sequential(
            nn.Conv2d(1, 4, 3), nn.Tanh(), nn.Conv2d(4, 3, 3), nn.Tanh(),
            nn.Flatten(), nn.Linear(3 * 2 * 2, 2),
        )  # fmt: skip
        x, pairs = torch.randn(5, 1, 6, 6), [(net[0], net[2])]
    flipped = _flip_signs(copy.deepcopy(net), pairs)
    torch.testing.assert_close(flipped(x), net(x), atol=1e-5, rtol=0)
    old, new = to_graph(net), to_graph(flipped)
    assert not torch.equal(old.edge_attr, new.edge_attr)
    for canonical in (True, False):
        config = WeightSpaceConfig(fourier_features=3, sign_canonical=canonical)
        model = _model(kind, old.edge_attr.shape[1], config)
        model.features.fit_input_scales(Batch.from_data_list([old, new]))
        with torch.no_grad():
            a, b = model(old), model(new)
        if canonical:
            torch.testing.assert_close(b.graph, a.graph, atol=ATOL, rtol=0)
            torch.testing.assert_close(b.node, a.node, atol=ATOL, rtol=0)
        else:  # the flips are visible to a model without the option
            assert (b.graph - a.graph).abs().max() > 1e-3


def test_canonical_signs_leave_other_neurons_alone():
    from lopt.weightspace.graph.data import ACTIVATIONS
    from lopt.weightspace.models.features import canonical_signs

    # ReLU neurons and a tanh neuron feeding a residual sum cannot be flipped.
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
            self.out = nn.Linear(4, 2)

        def forward(self, x):
            h = torch.tanh(self.a(x))
            return self.out(h + torch.tanh(self.b(h)))

    torch.manual_seed(0)
    for net in (mlp(), Residual()):
        g = to_graph(net)
        x, e = canonical_signs(g)
        tanh = g.node_act == ACTIVATIONS.index("tanh")
        flippable = tanh & (g.node_role == NODE_ROLES.index("hidden"))
        assert (g.x[:, 0] < 0).any()
        if isinstance(net, Residual):
            torch.testing.assert_close((x, e), (g.x, g.edge_attr))
        else:  # tanh layers of mlp() are flipped, its ReLU layers are not
            assert torch.all(x[flippable, 0] >= 0)
            relu = g.node_act == ACTIVATIONS.index("relu")
            torch.testing.assert_close(x[relu], g.x[relu])


def test_neuron_statistics_are_each_neurons_and_its_layers_weight_statistics():
    from lopt.weightspace import neuron_statistics
    from lopt.weightspace.models.features import NEURON_STATISTICS

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    g = to_graph(net)
    stats = neuron_statistics(g)
    assert stats.shape == (g.num_nodes, len(NEURON_STATISTICS))
    col = {name: stats[:, i] for i, name in enumerate(NEURON_STATISTICS)}
    w1, b1, w2 = net[0].weight.detach(), net[0].bias.detach(), net[2].weight.detach()
    hidden = (g.node_layer == 1).nonzero().flatten()
    # Hidden neurons follow the rows of the first layer's weight, in order.
    torch.testing.assert_close(g.x[hidden, 0], b1)

    def std(t, dim=None):
        return t.std(dim, unbiased=False) if dim is not None else t.std(unbiased=False)

    expect = {
        "in_mean": w1.mean(1),
        "in_std": std(w1, 1),
        "in_abs": w1.abs().mean(1),
        "in_max": w1.abs().amax(1),
        "in_log_degree": torch.full((4,), 4.0).log(),
        "out_mean": w2.mean(0),
        "out_std": std(w2, 0),
        "out_abs": w2.abs().mean(0),
        "out_max": w2.abs().amax(0),
        "out_log_degree": torch.full((4,), 3.0).log(),
        "layer_mean": w1.mean().expand(4),
        "layer_std": std(w1).expand(4),
        "layer_abs": w1.abs().mean().expand(4),
        "layer_bias_mean": b1.mean().expand(4),
        "layer_bias_std": std(b1).expand(4),
        "layer_log_size": torch.full((4,), 5.0).log(),
        "rel_depth": torch.full((4,), 0.5),
        "log_depth": torch.full((4,), 3.0).log(),
    }
    for name, value in expect.items():
        torch.testing.assert_close(col[name][hidden], value, msg=name)
    # Input neurons have no incoming edges and sit at depth 0 of 2.
    inputs = g.node_layer == 0
    assert torch.all(col["in_log_degree"][inputs] == 0)
    assert torch.all(col["rel_depth"][inputs] == 0)
    # In a batch each graph's rows are its own: statistics of one layer and
    # one graph do not mix with the other graph's.
    other = to_graph(nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2)))
    batch = Batch.from_data_list([g, other])
    torch.testing.assert_close(
        neuron_statistics(batch), torch.cat([stats, neuron_statistics(other)])
    )


def test_neuron_statistics_are_standardised_once_fitted_and_widen_node_inputs():
    torch.manual_seed(0)
    graphs = [to_graph(mlp(seed=i)) for i in range(3)]
    batch = Batch.from_data_list(graphs)
    plain = NeuralGraphFeaturizer(1, WeightSpaceConfig(**OFF))
    featurizer = NeuralGraphFeaturizer(
        1, WeightSpaceConfig(neuron_statistics=True, **OFF)
    )
    from lopt.weightspace.models.features import NEURON_STATISTICS

    assert featurizer.node_in == plain.node_in + len(NEURON_STATISTICS)
    featurizer.fit_input_scales(batch)
    nodes, _ = featurizer(batch)
    stats = nodes[:, plain.node_in :]
    # Standardised on the fitting graphs: zero mean, unit std where not constant.
    torch.testing.assert_close(
        stats.mean(0), torch.zeros(stats.shape[1]), atol=1e-4, rtol=0
    )
    # Unit std, or zero for the columns constant on these graphs (all have
    # the same depth).
    spread = stats.std(0)
    unit = (spread - 1).abs() < 1e-3
    assert torch.all(unit | (spread < 1e-6))
    assert unit.sum() > len(NEURON_STATISTICS) // 2


def test_quantile_scale_maps_each_column_through_its_distribution():
    from lopt.weightspace.models.features import quantile_scale

    r3 = 3.0**0.5
    # Column 0: knots 0, 1, 2, 3, 4; column 1: 0, 0, 0, 1, 5 (a tie at 0).
    knots = torch.tensor([[0, 0], [1, 0], [2, 0], [3, 1], [4, 5.0]])
    values = torch.tensor([[0, 0], [1, 0.5], [2.5, 1], [4, 3], [-9, -1], [99, 99.0]])
    out = quantile_scale(values, knots)
    # Levels: knot j of 5 sits at j / 4; linear in between; the ends beyond.
    # Column 1's three zeros share the mean of their levels, 1 / 4.
    level = torch.tensor(
        [
            [0, 1 / 4],
            [1 / 4, 2 / 4],
            [2.5 / 4, 3 / 4],
            [1, 3.5 / 4],
            [0, 1 / 4],
            [1, 1],
        ]
    )
    torch.testing.assert_close(out, (2 * level - 1) * r3)
    # On the values the knots were fitted on: uniform with unit variance,
    # order kept, heavy tails no longer squeeze the bulk.
    gen = torch.Generator().manual_seed(0)
    heavy = torch.randn(4000, 2, generator=gen).exp() ** 4
    fitted = torch.quantile(heavy, torch.linspace(0, 1, 101), dim=0)
    scaled = quantile_scale(heavy, fitted)
    torch.testing.assert_close(scaled.std(0), torch.ones(2), atol=0.01, rtol=0)
    assert torch.equal(scaled[:, 0].argsort(), heavy[:, 0].argsort())
    standard = (heavy - heavy.mean(0)) / heavy.std(0)
    middle = slice(1000, 3000)  # the middle half, in order
    bulk = lambda z: z[:, 0].sort().values[middle]  # noqa: E731
    assert bulk(standard).std() < 0.01 < 0.4 < bulk(scaled).std()
    # Continuous at a shared value: a hair off it moves the output a hair.
    near = quantile_scale(torch.tensor([[0.0, 1e-6], [0.0, -1e-6]]), knots)
    torch.testing.assert_close(
        near, out[:2, :].new_tensor([[-r3, -r3 / 2]] * 2), atol=1e-5, rtol=0
    )
    with pytest.raises(ValueError, match=r"knots must be \(K >= 2, 2\), got \(1, 2\)"):
        quantile_scale(values, knots[:1])


def test_quantile_scaled_statistics_are_fitted_and_stay_invariant():
    model, permuted, x, old, new, relabel = permuted_graphs("cnn", CASES)
    config = WeightSpaceConfig(
        neuron_statistics=True, statistics_scaling="quantile", **OFF
    )
    plain = NeuralGraphFeaturizer(old.edge_attr.shape[1], WeightSpaceConfig(**OFF))
    featurizer = NeuralGraphFeaturizer(old.edge_attr.shape[1], config)
    others = [to_graph(cnn(seed=i)) for i in range(1, 4)]
    batch = Batch.from_data_list([old, *others])
    featurizer.fit_input_scales(batch)
    assert featurizer.stat_knots.shape == (101, featurizer.node_in - plain.node_in)
    assert not len(featurizer.stat_scale)  # quantiles instead of the std
    nodes, _ = featurizer(batch)
    stats = nodes[:, plain.node_in :]
    assert stats.abs().max() <= 3.0**0.5 + 1e-6
    # Columns that vary on the fitting graphs spread over the whole range.
    spread = stats.std(0)
    assert torch.all((spread > 0.5) | (spread < 1e-6)) and (spread > 0.5).sum() > 5
    node_old, edge_old = featurizer(old)
    node_new, edge_new = featurizer(new)
    torch.testing.assert_close(node_new, node_old[relabel])
    match = edge_match(old, new, relabel)
    torch.testing.assert_close(edge_new, edge_old[match])
    # The fitted knots travel in the state_dict.
    assert "stat_knots" in featurizer.state_dict()


@pytest.mark.parametrize("scaling", ["standard", "quantile"])
def test_a_fitted_model_loads_into_a_fresh_one(scaling):
    graphs = Batch.from_data_list([to_graph(mlp(seed=i)) for i in range(3)])
    config = WeightSpaceConfig(neuron_statistics=True, statistics_scaling=scaling)
    fitted = _model("gnn", 1, config, seed=0)
    fitted.features.fit_input_scales(graphs)
    fresh = _model("gnn", 1, config, seed=1)
    with torch.no_grad():
        assert not torch.allclose(fresh(graphs).graph, fitted(graphs).graph)
        fresh.load_state_dict(fitted.state_dict())
        torch.testing.assert_close(fresh(graphs).graph, fitted(graphs).graph)
    # A mismatch that is not a fitted scale still fails loudly.
    other = _model("gnn", 1, WeightSpaceConfig(), seed=0)
    with pytest.raises(RuntimeError, match="size mismatch for backbone"):
        other.load_state_dict(fitted.state_dict())


def test_layer_rms_is_each_layers_own_and_layer_normalised_edges_drop_the_scale():
    from lopt.weightspace.models.features import layer_rms

    nets = [mlp(seed=0), mlp(seed=1)]
    batch = Batch.from_data_list([to_graph(n) for n in nets])
    rms = layer_rms(batch)
    linears = [m for n in nets for m in n if isinstance(m, nn.Linear)]
    want = [m.weight.detach().pow(2).mean().sqrt() for m in linears]
    # Edges are grouped by graph and target depth, so each distinct value is
    # one linear layer's weight RMS.
    got = sorted(set(rms.tolist()))
    assert len(got) == len(want)
    torch.testing.assert_close(torch.tensor(got), torch.stack(want).sort().values)
    # Scaling one network's layer changes its edges, not their normalised form.
    config = WeightSpaceConfig(layer_normalised_edges=True, **OFF)
    featurizer = NeuralGraphFeaturizer(1, config)
    scaled = copy.deepcopy(nets[0])
    with torch.no_grad():
        scaled[0].weight.mul_(7.0)
    _, edges = featurizer(to_graph(nets[0]))
    _, edges_scaled = featurizer(to_graph(scaled))
    torch.testing.assert_close(edges_scaled, edges)
    plain = NeuralGraphFeaturizer(1, WeightSpaceConfig(**OFF))
    assert not torch.allclose(plain(to_graph(scaled))[1], plain(to_graph(nets[0]))[1])


def test_depth_pool_gives_one_bin_per_layer_and_spreads_shallow_networks():
    from lopt.weightspace.models.readout import depth_pool

    # Graph 0: depths 0..4 (one bin per depth); graph 1: depths 0..2;
    # graph 2: depths 0..5.
    depth = torch.tensor([0, 1, 1, 2, 3, 4, 0, 1, 2, 2, 0, 1, 2, 3, 4, 5])
    index = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2])
    values = torch.arange(16.0)[:, None]
    deepest = torch.tensor([4, 2, 5])
    out = depth_pool(values, depth, index, deepest, 3, bins=4)
    assert out.shape == (3, 5)
    torch.testing.assert_close(out[0], torch.tensor([0.0, 1.5, 3.0, 4.0, 5.0]))
    # Depth 1 of 2 is half way (bin 2), depth 2 of 2 the last bin (4).
    torch.testing.assert_close(out[1], torch.tensor([6.0, 0.0, 7.0, 0.0, 8.5]))
    # Of 5: depth 1 goes to bin 1 (ceil 0.8; not the input's bin), depths 2
    # and 3 to bins 2 and 3 (ceil 1.6, ceil 2.4), depths 4 and 5 both to bin 4.
    torch.testing.assert_close(out[2], torch.tensor([10.0, 11.0, 12.0, 13.0, 14.5]))
    with pytest.raises(ValueError, match="depth_pool"):
        from lopt.weightspace.models.readout import pool

        pool(values, index, 2, "depth")
