"""The weight-space training harness: it learns, selects on validation,
predicts, and refuses bad input clearly."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lopt.weightspace import NeuralGraphGNN
from lopt.weightspace.baselines import FlatWeightsMLP, StatNN
from lopt.weightspace.training import (
    GraphPredictor,
    WeightSpaceData,
    WeightSpaceTrainer,
    kendall_tau,
)


def _net(seed: int, scale: float) -> nn.Sequential:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, 1))
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(scale)
    return net


def toy_split(n: int, offset: int, kernel=None) -> WeightSpaceData:
    """Class 1 nets have weights three times larger than class 0 nets: a
    trivially separable toy set (chance is 0.5)."""
    labels = [i % 2 for i in range(n)]
    nets = [_net(offset + i, 3.0 if y else 1.0) for i, y in enumerate(labels)]
    return WeightSpaceData.from_modules(nets, labels, kernel_size=kernel)


@pytest.fixture(scope="module")
def toy():
    train = toy_split(48, 0)
    return (
        train,
        toy_split(16, 1000, train.kernel_size),
        toy_split(24, 2000, train.kernel_size),
    )


def test_ng_gnn_beats_chance_on_a_separable_toy_set(toy):
    train, val, test = toy
    model = NeuralGraphGNN(train.edge_features, graph_out=2, node_dim=16, num_layers=1)
    trainer = WeightSpaceTrainer(
        model, "classification", lr=3e-3, epochs=25, batch_size=8
    )
    fit = trainer.fit(train, val)
    acc = trainer.evaluate(test)["accuracy"]
    assert acc >= 0.8, (acc, fit.history[-1])
    assert fit.metric == "accuracy" and 1 <= fit.best_epoch <= len(fit.history)
    assert fit.best_val == pytest.approx(
        fit.history[fit.best_epoch - 1]["val"]["accuracy"]
    )
    pred = trainer.predict(test)
    assert pred.shape == (len(test),) and pred.dtype == torch.long


def test_regression_reports_kendall_tau_and_label_units():
    scales = torch.linspace(0.5, 3.0, 40)
    nets = [_net(i, float(s)) for i, s in enumerate(scales)]
    data = WeightSpaceData.from_modules(nets, scales * 10)
    train, val = data.subset(range(0, 40, 2)), data.subset(range(1, 40, 2))
    trainer = WeightSpaceTrainer(StatNN(1, hidden=32), "regression", lr=3e-3, epochs=60)
    trainer.fit(train, val)
    metrics = trainer.evaluate(val)
    assert metrics["tau"] > 0.6
    pred = trainer.predict(val)
    # Predictions are in label units (labels span 5..30), not standardised.
    assert 3 < float(pred.mean()) < 32


def test_editing_learns_a_constant_shift():
    """Target: the network's output plus 0.5, reachable by its last bias; the
    harness must beat the identity edit."""
    nets = [_net(i, 1.0) for i in range(32)]
    grid = torch.rand(16, 2) * 2 - 1
    with torch.no_grad():
        target = torch.stack([n(grid).reshape(-1) + 0.5 for n in nets])
    data = WeightSpaceData.from_modules(nets, target=target, grid=grid)
    train, val = data.subset(range(24)), data.subset(range(24, 32))
    identity = float(((target[24:] - target[24:] + 0.5) ** 2).mean())
    trainer = WeightSpaceTrainer(
        FlatWeightsMLP(1, hidden=32), "editing", lr=3e-3, epochs=40, edit_scale=0.1
    )
    trainer.fit(train, val)
    mse = trainer.evaluate(val)["mse"]
    assert mse < 0.2 * identity, (mse, identity)
    assert trainer.predict(val).shape == (8, 16)


def test_seeded_fits_repeat_and_seeds_differ(toy):
    train, val, _ = toy

    def run(seed):
        model = NeuralGraphGNN(
            train.edge_features, graph_out=2, node_dim=8, num_layers=1
        )
        trainer = WeightSpaceTrainer(model, "classification", epochs=2, seed=seed)
        trainer.fit(train, val)
        return trainer.predict_raw(val)

    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))


def test_patience_stops_early(toy):
    train, val, _ = toy
    model = NeuralGraphGNN(train.edge_features, graph_out=2, node_dim=8, num_layers=1)
    fit = WeightSpaceTrainer(
        model, "classification", lr=1e-9, epochs=30, patience=2
    ).fit(train, val)
    assert fit.stopped == "patience" and len(fit.history) < 30


def test_lr_patience_halves_the_rate_on_each_plateau(toy):
    """With lr_patience=2 the rate halves after every second epoch in a row
    without a better validation accuracy, and only then; a tiny rate keeps
    the accuracy flat so that plateaus happen."""
    train, val, _ = toy
    model = NeuralGraphGNN(train.edge_features, graph_out=2, node_dim=8, num_layers=1)
    lr = 1e-6
    fit = WeightSpaceTrainer(
        model, "classification", lr=lr, epochs=9, patience=None, lr_patience=2
    ).fit(train, val)
    best, stale, expected = -1.0, 0, []
    for record in fit.history:
        expected.append(lr)
        if record["val"]["accuracy"] > best:
            best, stale = record["val"]["accuracy"], 0
        else:
            stale += 1
            if stale % 2 == 0:
                lr *= 0.5
    assert [r["lr"] for r in fit.history] == pytest.approx(expected)
    assert expected[-1] < expected[0]  # not vacuous: it did decay
    # Off by default: a constant rate.
    fit = WeightSpaceTrainer(
        model, "classification", lr=1e-6, epochs=4, patience=None
    ).fit(train, val)
    assert {r["lr"] for r in fit.history} == {1e-6}


def test_grad_clip_clips_every_step_to_the_given_norm(toy, monkeypatch):
    """Every step's gradient norm is clipped to ``grad_clip`` (measured after
    the clip); the default clips at 1, ``None`` never clips."""
    train, val, _ = toy
    norms, calls = [], []
    real = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm, *args, **kwargs):
        params = list(params)
        calls.append(max_norm)
        total = real(params, max_norm, *args, **kwargs)
        grads = [p.grad.flatten() for p in params if p.grad is not None]
        norms.append(float(torch.cat(grads).norm()))
        return total

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    model = NeuralGraphGNN(train.edge_features, graph_out=2, node_dim=8, num_layers=1)
    WeightSpaceTrainer(
        model, "classification", lr=1e-3, epochs=2, batch_size=4, grad_clip=1e-3
    ).fit(train, val)
    steps = 2 * -(-len(train) // 4)
    assert calls == [1e-3] * steps
    assert max(norms) <= 1e-3 * (1 + 1e-4)
    calls.clear()
    WeightSpaceTrainer(model, "classification", epochs=1).fit(train, val)
    assert calls == [1.0] * -(-len(train) // 32)  # one epoch of default batches
    calls.clear()
    WeightSpaceTrainer(model, "classification", epochs=1, grad_clip=None).fit(
        train, val
    )
    assert calls == []


def test_kendall_tau():
    assert kendall_tau(torch.arange(5.0), torch.arange(5.0)) == pytest.approx(1.0)
    assert kendall_tau(torch.arange(5.0), -torch.arange(5.0)) == pytest.approx(-1.0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"task": "ranking"}, "Invalid task"),
        ({"lr": 0.0}, "Invalid learning rate"),
        ({"epochs": 0}, "Invalid epochs"),
        ({"batch_size": 0}, "Invalid batch_size"),
        ({"patience": 0}, "Invalid patience"),
        ({"weight_decay": -1.0}, "Invalid weight_decay"),
        ({"edit_scale": 0.0}, "Invalid edit_scale"),
        ({"lr_patience": 0}, "Invalid lr_patience"),
        ({"grad_clip": 0.0}, "Invalid grad_clip"),
    ],
)
def test_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        WeightSpaceTrainer(NeuralGraphGNN(1), **kwargs)


def test_clear_errors_for_bad_data(toy):
    train, val, _ = toy
    with pytest.raises(TypeError, match="not a predictor"):
        WeightSpaceTrainer(nn.Linear(2, 2))
    trainer = WeightSpaceTrainer(
        NeuralGraphGNN(train.edge_features, graph_out=2), epochs=1
    )
    with pytest.raises(RuntimeError, match="fit"):
        trainer.predict(val)
    with pytest.raises(TypeError, match="WeightSpaceData"):
        trainer.fit([1, 2, 3])
    floats = train.subset(range(len(train)))
    floats.y = floats.y.float()
    with pytest.raises(ValueError, match="integer class labels"):
        trainer.fit(floats)
    too_few = WeightSpaceTrainer(
        NeuralGraphGNN(train.edge_features, graph_out=1), epochs=1
    )
    with pytest.raises(ValueError, match="graph_out >= classes"):
        too_few.fit(train)
    unlabelled = WeightSpaceData.from_modules([_net(0, 1.0)])
    with pytest.raises(ValueError, match="needs labels"):
        trainer.fit(unlabelled)
    with pytest.raises(ValueError, match="editing needs"):
        WeightSpaceTrainer(NeuralGraphGNN(1), "editing").fit(train)


def test_weightspace_data_checks_lengths():
    nets = [_net(i, 1.0) for i in range(3)]
    with pytest.raises(ValueError, match="got 2 labels for 3"):
        WeightSpaceData.from_modules(nets, [0, 1])
    with pytest.raises(ValueError, match="both target and grid"):
        WeightSpaceData.from_modules(nets, target=torch.zeros(3, 4))
    with pytest.raises(ValueError, match="at least one"):
        WeightSpaceData([], [], [])
    data = WeightSpaceData.from_modules(nets, [0, 1, 0])
    other = WeightSpaceData.from_modules([nn.Sequential(nn.Linear(2, 3))])
    mixed = WeightSpaceData(
        data.graphs[:1] + other.graphs,
        data.state_dicts[:1] + other.state_dicts,
        nets[:1] + [nn.Linear(2, 3)],
    )
    with pytest.raises(ValueError, match="another architecture"):
        mixed.stacked_state([0, 1])


def test_fitted_input_scales_keep_graph_outputs_invariant(toy):
    """Scaling per layer depth commutes with permuting hidden neurons."""
    from lopt.weightspace.baselines import permute_hidden

    train, _, _ = toy
    model = NeuralGraphGNN(train.edge_features, graph_out=3, node_dim=8, num_layers=2)
    predictor = GraphPredictor(model)
    predictor.prepare(train)
    assert model.features.node_scale.shape[0] >= 3
    net = _net(7, 2.0)
    permuted = _net(7, 2.0)
    permuted.load_state_dict(
        permute_hidden(net.state_dict(), torch.Generator().manual_seed(1))
    )
    data = WeightSpaceData.from_modules([net, permuted], kernel_size=train.kernel_size)
    with torch.no_grad():
        out = predictor(predictor.collate(data, [0, 1]))
    torch.testing.assert_close(out[0], out[1], atol=1e-5, rtol=1e-5)
    # The scales are used: unscaled inputs give other outputs.
    with torch.no_grad():
        scaled = predictor(predictor.collate(data, [0]))
        model.features.node_scale = torch.ones(0)
        model.features.edge_scale = torch.ones(0)
        plain = predictor(predictor.collate(data, [0]))
    assert not torch.allclose(scaled, plain)


def _poisoned(data: WeightSpaceData) -> WeightSpaceData:
    """``data`` with one NaN weight in its first graph, as a split built
    without the entry checks (a WeightSpaceData made by hand) would have."""
    bad = data.subset(range(len(data)))
    bad.graphs[0] = bad.graphs[0].clone()
    bad.graphs[0].edge_attr[0, 0] = float("nan")
    return bad


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_a_fit_with_no_finite_score_fails_loudly(toy, task):
    train, val, _ = toy
    if task == "regression":
        train, val = (d.subset(range(len(d))) for d in (train, val))
        train.y, val.y = train.y.float(), val.y.float()
    model = NeuralGraphGNN(train.edge_features, graph_out=2, node_dim=8, num_layers=1)
    trainer = WeightSpaceTrainer(model, task, epochs=3, batch_size=len(train))
    message = "no epoch with a finite training loss in 3 epochs .*from epoch 1"
    with pytest.raises(RuntimeError, match=message):
        trainer.fit(_poisoned(train), val)
    with pytest.raises(RuntimeError, match=message):
        trainer.fit(_poisoned(train))
    # A NaN validation network: its predictions are named.
    if task == "regression":
        with pytest.raises(RuntimeError, match=r"validation networks \[0\] are not"):
            trainer.fit(train, _poisoned(val))
    # The same data without the NaN fits, and the check passes.
    assert math.isfinite(trainer.fit(train, val).best_val)


class _Constant(nn.Module):
    """A predictor whose output is one learned value for every network."""

    def __init__(self):
        super().__init__()
        self.value = nn.Parameter(torch.zeros(1))

    def collate(self, data, index):
        return len(index)

    def forward(self, count):
        return self.value.expand(count, 1)


def test_constant_predictions_warn_and_report_nan_not_minus_inf(toy):
    train, val, _ = toy
    train, val = (d.subset(range(len(d))) for d in (train, val))
    train.y, val.y = train.y.float(), val.y.float()
    trainer = WeightSpaceTrainer(_Constant(), "regression", epochs=2)
    with pytest.warns(RuntimeWarning, match="constant on every validation"):
        fit = trainer.fit(train, val)
    assert math.isnan(fit.best_val)
