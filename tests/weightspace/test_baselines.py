"""Baselines of the weight-space benchmark: output contracts, the symmetry
each one claims, and what permutation augmentation does."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lopt.weightspace.baselines import (
    FlatWeightsMLP,
    ImagePredictor,
    NFNPredictor,
    ProbePredictor,
    StatNN,
    StatNNTrees,
    chain_layers,
    permute_hidden,
    weight_statistics,
)
from lopt.weightspace.training import WeightSpaceData, WeightSpaceTrainer
from lopt.weightspace.zoos.specs import build_module

CNN_SPEC = {
    "kind": "cnn",
    "channels": [4, 6],
    "kernels": [3, 3],
    "strides": [1, 2],
    "activation": "relu",
}
SIREN_SPEC = {"kind": "siren", "widths": [2, 8, 8, 1]}


def _module(spec, seed):
    torch.manual_seed(seed)
    return build_module(spec).eval()


def _flatten_cnn(seed):
    """A CNN whose head reads a flattened spatial map (blockwise columns)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3),
        nn.ReLU(),
        nn.Conv2d(3, 4, 3),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 5),
    ).eval()


@pytest.mark.parametrize(
    "make, x",
    [
        (lambda s: _module(SIREN_SPEC, s), torch.rand(10, 2)),
        (lambda s: _module(CNN_SPEC, s), torch.randn(3, 1, 8, 8)),
        (_flatten_cnn, torch.randn(3, 1, 8, 8)),
    ],
)
def test_permute_hidden_preserves_the_function_and_moves_the_weights(make, x):
    net = make(0)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    permuted = permute_hidden(state, torch.Generator().manual_seed(3))
    assert any(not torch.equal(state[k], permuted[k]) for k in state)
    with torch.no_grad():
        before = net(x)
        net.load_state_dict(permuted)
        after = net(x)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    assert torch.equal(
        permuted[list(state)[0]].sort(0).values.sum(),
        state[list(state)[0]].sort(0).values.sum(),
    )


def test_permute_hidden_refuses_shortcuts():
    net = _module({**CNN_SPEC, "residual": True}, 0)
    with pytest.raises(ValueError, match="chains only"):
        permute_hidden(net.state_dict())


def test_statnn_features_are_invariant_to_hidden_permutations():
    for make in (lambda: _module(SIREN_SPEC, 1), lambda: _module(CNN_SPEC, 1)):
        state = make().state_dict()
        permuted = permute_hidden(state, torch.Generator().manual_seed(0))
        depth = len(chain_layers(state))
        for per_layer in (depth, None):
            a = weight_statistics(state, per_layer)
            torch.testing.assert_close(weight_statistics(permuted, per_layer), a)
        assert weight_statistics(state, depth).shape == (depth * 28,)
        assert weight_statistics(state).shape == (4 * 28 + 1,)
    with pytest.raises(ValueError, match="layers"):
        weight_statistics(state, depth + 1)


def test_statnn_handles_mixed_architectures():
    specs = [
        CNN_SPEC,
        {
            **CNN_SPEC,
            "channels": [4, 6, 8],
            "kernels": [3, 5, 3],
            "strides": [1, 1, 2],
            "batchnorm": True,
            "residual": True,
        },
    ]
    nets = [_module(specs[i % 2], i) for i in range(8)]
    data = WeightSpaceData.from_modules(nets, torch.rand(8))
    model = StatNN(1, hidden=16)
    model.prepare(data)
    assert model.per_layer is None
    assert model(model.collate(data, [0, 1, 2])).shape == (3, 1)
    # Quantile scaling: the standardised features through their training
    # quantiles, so each varying one spreads over [-sqrt 3, sqrt 3] on train.
    quant = StatNN(1, scaling="quantile", hidden=16)
    quant.prepare(data)
    scaled = quant.collate(data, list(range(8)))
    standard = model.collate(data, list(range(8)))
    assert torch.equal(scaled.argsort(0), standard.argsort(0))  # monotone
    assert scaled.abs().max() <= 3.0**0.5 + 1e-6
    # A column's unique smallest / largest training value maps to an end
    # (tied values share the middle of their levels instead).
    low, high = standard.min(0).values, standard.max(0).values
    lone_low = (standard == low).sum(0) == 1
    lone_high = (standard == high).sum(0) == 1
    assert lone_low.sum() > 10 and lone_high.sum() > 10
    r3 = torch.tensor(3.0**0.5)
    torch.testing.assert_close(
        scaled.min(0).values[lone_low], -r3.expand(int(lone_low.sum()))
    )
    torch.testing.assert_close(
        scaled.max(0).values[lone_high], r3.expand(int(lone_high.sum()))
    )
    assert "scaling='quantile'" in repr(quant)
    with pytest.raises(ValueError, match="Invalid scaling: 'rank'"):
        StatNN(1, scaling="rank")


@pytest.fixture(scope="module")
def sirens():
    nets = [_module(SIREN_SPEC, i) for i in range(12)]
    grid = torch.rand(5, 2) * 2 - 1
    with torch.no_grad():
        target = torch.stack([n(grid).reshape(-1) for n in nets])
    return WeightSpaceData.from_modules(
        nets,
        [i % 3 for i in range(12)],
        target=target,
        grid=grid,
        extras={"image": torch.rand(12, 4, 4)},
    )


@pytest.mark.parametrize(
    "make",
    [
        lambda: FlatWeightsMLP(3, hidden=8),
        lambda: FlatWeightsMLP(3, augment=True, hidden=8),
        lambda: StatNN(3, hidden=8),
        lambda: NFNPredictor(3, hidden=4, layers=1),
        lambda: ProbePredictor(3, num_probes=6, input_dim=2, hidden=8),
        lambda: ImagePredictor(3, hidden=8),
    ],
)
def test_graph_level_contract(sirens, make):
    model = make()
    model.task = "classification"
    model.prepare(sirens)
    out = model(model.collate(sirens, [0, 3, 5, 7]))
    assert out.shape == (4, 3)
    out.sum().backward()


@pytest.mark.parametrize(
    "make",
    [lambda: FlatWeightsMLP(1, hidden=8), lambda: NFNPredictor(1, hidden=4, layers=1)],
)
def test_editing_contract(sirens, make):
    model = make()
    model.task = "editing"
    model.prepare(sirens)
    deltas = model(model.collate(sirens, [1, 2]))
    state = sirens.state_dicts[0]
    assert list(deltas) == list(state)
    for key, value in state.items():
        assert deltas[key].shape == (2, *value.shape)


def test_nfn_is_invariant_to_hidden_permutations(sirens):
    torch.manual_seed(0)
    model = NFNPredictor(3, hidden=4, layers=2)
    model.prepare(sirens)
    model.eval()
    permuted = WeightSpaceData(
        sirens.graphs,
        [
            permute_hidden(s, torch.Generator().manual_seed(i))
            for i, s in enumerate(sirens.state_dicts)
        ],
        sirens.modules,
        sirens.y,
    )
    with torch.no_grad():
        a = model(model.collate(sirens, list(range(12))))
        b = model(model.collate(permuted, list(range(12))))
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_nfn_refuses_norm_layers():
    nets = [_module({**CNN_SPEC, "batchnorm": True}, i) for i in range(2)]
    data = WeightSpaceData.from_modules(nets, [0.1, 0.2])
    with pytest.raises(ValueError, match="weight \\+ bias"):
        NFNPredictor(1).prepare(data)


def test_trees_fit_in_the_harness(sirens):
    trainer = WeightSpaceTrainer(StatNNTrees(3, max_iter=5), "classification")
    fit = trainer.fit(sirens, sirens)
    assert fit.stopped == "fit"
    assert trainer.predict(sirens).shape == (12,)
    assert 0 <= trainer.evaluate(sirens)["accuracy"] <= 1


def test_image_predictor_needs_images(sirens):
    plain = WeightSpaceData(sirens.graphs, sirens.state_dicts, sirens.modules, sirens.y)
    with pytest.raises(ValueError, match="extras\\['image'\\]"):
        ImagePredictor(3).prepare(plain)


def test_augmentation_permutes_during_training_only(sirens):
    model = FlatWeightsMLP(3, augment=True, hidden=8)
    model.prepare(sirens)
    model.generator = torch.Generator().manual_seed(0)
    model.train()
    a = model.collate(sirens, [0])
    assert not torch.equal(a, model.collate(sirens, [0]))
    model.eval()
    assert torch.equal(model.collate(sirens, [0]), model.collate(sirens, [0]))
    # Per-tensor standardisation: a permuted network has the same multiset of
    # standardised inputs.
    torch.testing.assert_close(
        a.sort().values, model.collate(sirens, [0]).sort().values
    )


def test_a_diverged_network_gets_finite_statnn_features_and_trees_still_fit():
    nets = [_module(CNN_SPEC, i) for i in range(12)]
    with torch.no_grad():
        nets[3].features[0].conv.weight.mul_(1e20)  # variance 1e40: beyond float32
    data = WeightSpaceData.from_modules(nets, torch.rand(12))
    feats = weight_statistics(nets[3].state_dict())
    assert torch.isfinite(feats).all() and feats.abs().max() == 1e30
    for make in (lambda: StatNN(1, hidden=8), lambda: StatNNTrees(1, max_iter=5)):
        trainer = WeightSpaceTrainer(make(), "regression", epochs=2, progress=False)
        trainer.fit(data, data)
        assert torch.isfinite(trainer.predict(data)).all()


class _NormsApart(nn.Module):
    """Linear layers and their LayerNorms in two ModuleLists: registration
    order puts every norm after the last layer."""

    def __init__(self):
        super().__init__()
        self.linears = nn.ModuleList(
            [nn.Linear(3, 5), nn.Linear(5, 4), nn.Linear(4, 1)]
        )
        self.norms = nn.ModuleList([nn.LayerNorm(5), nn.LayerNorm(4)])

    def forward(self, x):
        for linear, norm in zip(self.linears, self.norms):
            x = torch.tanh(norm(linear(x)))
        return self.linears[-1](x)


def test_statnn_groups_layers_by_the_traced_forward_not_registration():
    from lopt.weightspace.baselines.permutations import chain_layers

    torch.manual_seed(0)
    apart = _NormsApart()
    with torch.no_grad():
        for p in apart.parameters():
            p.normal_()
    layers = chain_layers(apart.state_dict(), apart)
    assert [layer.get("norm_weight") for layer in layers] == [
        "norms.0.weight",
        "norms.1.weight",
        None,
    ]
    assert layers[0]["bias"] == "linears.0.bias"
    # Registration order alone gets it wrong (the failure this guards against).
    assert chain_layers(apart.state_dict())[0].get("norm_weight") is None
    # The same network written as one Sequential gives the same features.
    lin, norm = apart.linears, apart.norms
    seq = nn.Sequential(lin[0], norm[0], nn.Tanh(), lin[1], norm[1], nn.Tanh(), lin[2])
    data = WeightSpaceData.from_modules([apart, seq], [0.0, 1.0])
    model = StatNN(1, hidden=4)
    model.prepare(data)
    assert model.per_layer == 3
    feats = model.features(data, [0, 1])
    assert torch.equal(feats[0], feats[1])
