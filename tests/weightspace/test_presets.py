"""Named presets equal the weight-space benchmark's models and settings, the
library's defaults are the best preset's, and a preset trains."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from benchmarks.weightspace import run as bench
from lopt.weightspace import (
    PRESETS,
    NeuralGraphGNN,
    WeightSpaceConfig,
    WeightSpaceData,
    WeightSpaceTrainer,
    preset,
)

ROOT = Path(__file__).resolve().parents[2]


def _split(kernel: int, n: int = 4) -> WeightSpaceData:
    torch.manual_seed(0)
    if kernel == 1:
        nets = [nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 3))] * n
    else:
        conv = nn.Sequential(nn.Conv2d(1, 3, kernel), nn.ReLU(), nn.Flatten())
        nets = [conv] * n
    return WeightSpaceData.from_modules(nets, [0.1 * i for i in range(n)])


def _benchmark_settings(p) -> bench.Settings:
    """The settings of the benchmark command that gave the preset's figure."""
    argv = ["--tasks", "cnn_wild", "--models", p.benchmark_model, *p.benchmark_flags]
    return bench.settings_from_args(bench._parse(argv))


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("kernel", [1, 3])
def test_each_preset_is_the_benchmarks_model(name, kernel):
    p = preset(name)
    settings = _benchmark_settings(p)
    train = _split(kernel)
    torch.manual_seed(0)
    made = bench.model_factories("cnn_wild", settings, train)[p.benchmark_model]()
    torch.manual_seed(0)
    ours = p.build_model(train.edge_features, 1, train.output_neurons)
    assert type(ours) is type(made)
    assert ours.get_config() == made.get_config()
    assert ours.config.fourier_features == (16 if kernel == 1 else 0)
    theirs = made.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in ours.state_dict().items())


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_each_preset_trains_as_the_benchmark_did(name):
    p = preset(name)
    s = _benchmark_settings(p)
    assert p.trainer_kwargs == {
        "lr": s.lr,
        "epochs": s.epochs,
        "batch_size": s.batch_size,
        "patience": s.patience,
        "grad_clip": s.grad_clip,
        "max_seconds": s.max_seconds,
        "lr_patience": s.lr_patience,
    }


def test_the_best_presets_figure_and_command_are_the_benchmark_readmes():
    text = " ".join((ROOT / "benchmarks/weightspace/README.md").read_text().split())
    best = preset("ng-gnn-best")
    command = re.search(
        r"`(python -m benchmarks\.weightspace --tasks cnn_wild "
        r"--max-eval 0 --models ng_gnn_qstats_ln[^`]*)`",
        text,
    )
    assert command, "the W21 command is no longer in the benchmark README"
    assert " ".join(best.benchmark_flags) in command.group(1)
    assert "| NG-GNN +qstats +LN edges | **0.765" in text
    assert "0.765" in best.description


def test_library_defaults_are_the_best_presets():
    """Where the benchmark and the library could differ, they do not: the
    trainer's defaults are the best preset's settings (but its time cap),
    NG-GNN's depth and widths are its model's, and the default config gives
    16 Fourier features on scalar weights and none on kernels."""
    best = preset("ng-gnn-best")
    defaults = {
        k: v.default
        for k, v in inspect.signature(WeightSpaceTrainer).parameters.items()
    }
    for key, value in best.trainer_kwargs.items():
        if key != "max_seconds":  # a budget of the benchmark's CPU
            assert defaults[key] == value, key
    assert defaults["max_seconds"] is None
    model = NeuralGraphGNN(1)
    expected = {**best.model_kwargs, "pooling": list(best.model_kwargs["pooling"])}
    assert {k: model.get_config()[k] for k in expected} == expected
    assert model.get_config()["num_layers"] == 3
    assert NeuralGraphGNN(1).config.fourier_features == 16
    assert NeuralGraphGNN(9).config.fourier_features == 0
    assert WeightSpaceConfig(fourier_features=4).for_edges(1).fourier_features == 4


def test_a_preset_builds_a_trainer_for_a_split():
    train = _split(1, 6)
    trainer = preset("ng-gnn-best").trainer(train, "regression", epochs=1)
    assert trainer.epochs == 1 and trainer.grad_clip == 1.0
    assert trainer.patience == 20 and trainer.max_seconds == 700.0
    assert trainer.model.model.config.layer_normalised_edges
    classes = WeightSpaceData.from_modules(train.modules, [0, 1, 2, 0, 1, 2])
    trainer = preset("ng-t").trainer(classes, "classification", epochs=1)
    assert trainer.model.model.graph_out == 3
    trainer.fit(classes)
    with pytest.raises(ValueError, match="Invalid preset: 'best'"):
        preset("best")
