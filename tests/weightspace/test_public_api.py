"""What a new user reaches from ``lopt.weightspace``: baselines and metrics
exported, and errors that name the knob to turn (``max_positions``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lopt.weightspace as ws
from lopt.weightspace import baselines, training


def test_baselines_metrics_presets_and_saving_are_exported():
    from lopt.weightspace.saving import savable_classes

    names = [n for n in savable_classes() if hasattr(baselines, n)]
    fitted = (
        "StatNN StatNNTrees FlatWeightsMLP NFNPredictor ProbePredictor ImagePredictor"
    )
    assert set(fitted.split()) <= set(names)  # every baseline a user fits and saves
    for name in [*names, "weight_statistics"]:
        assert name in ws.__all__ and getattr(ws, name) is getattr(baselines, name)
    assert ws.kendall_tau is training.kendall_tau
    assert ws.kendall_tau(torch.arange(4.0), torch.tensor([1.0, 2, 4, 3])) == (
        pytest.approx(4 / 6)
    )
    for name in ("preset", "PRESETS", "save_predictor", "load_predictor"):
        assert name in ws.__all__ and hasattr(ws, name)
    assert all(hasattr(ws, name) for name in ws.__all__)


def _wide(inputs: int, n: int = 4) -> ws.WeightSpaceData:
    torch.manual_seed(0)
    nets = [nn.Sequential(nn.Linear(inputs, 3), nn.ReLU(), nn.Linear(3, 1))] * n
    return ws.WeightSpaceData.from_modules(nets, [0.1 * i for i in range(n)])


def test_more_inputs_than_max_positions_fail_at_prepare_naming_the_knob(monkeypatch):
    train = _wide(70)
    trainer = ws.WeightSpaceTrainer(ws.NeuralGraphGNN(1), "regression", epochs=1)
    # It fails before any training step.
    monkeypatch.setattr(trainer, "_loss", lambda *a: pytest.fail("trained"))
    with pytest.raises(
        ValueError,
        match=r"Invalid max_positions: 64.*network 0"
        r".*position 69.*WeightSpaceConfig\(max_positions=70\)",
    ):
        trainer.fit(train)
    with pytest.raises(ValueError, match="max_positions=70"):
        ws.preset("ng-gnn-best").trainer(train)
    # The knob it names works, and without positions there is no limit.
    wide = ws.WeightSpaceConfig(max_positions=70)
    monkeypatch.undo()
    ws.WeightSpaceTrainer(
        ws.NeuralGraphGNN(1, config=wide), "regression", epochs=1
    ).fit(train)
    plain = ws.WeightSpaceConfig(positional=False)
    ws.GraphPredictor(ws.NeuralGraphGNN(1, config=plain)).prepare(train)
    ws.GraphPredictor(ws.NeuralGraphGNN(1)).prepare(_wide(64))
