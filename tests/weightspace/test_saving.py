"""A fitted predictor saves to one safetensors file (JSON in its metadata) and
loads into a trainer whose predictions are identical, for every model kind;
bad files fail clearly and a failed save leaves the old file whole."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lopt.weightspace import (
    FlatWeightsMLP,
    ImagePredictor,
    NeuralGraphGNN,
    NeuralGraphTransformer,
    NFNPredictor,
    ProbePredictor,
    StatNN,
    StatNNTrees,
    WeightSpaceConfig,
    WeightSpaceData,
    WeightSpaceTrainer,
    load_predictor,
    save_predictor,
)
from lopt.weightspace.baselines.trees import TreeEnsemble

QSTATS = WeightSpaceConfig(
    neuron_statistics=True,
    statistics_scaling="quantile",
    layer_normalised_edges=True,
    fourier_features=2,
)


def _net(i: int) -> nn.Module:
    torch.manual_seed(i)
    net = nn.Sequential(nn.Linear(2, 5), nn.Tanh(), nn.Linear(5, 1))
    with torch.no_grad():
        net[0].weight.mul_(1 + (i % 3))
    return net


@pytest.fixture(scope="module")
def splits():
    # 48 training networks: the trees' leaves need 20 each to split.
    nets = [_net(i) for i in range(60)]
    grid = torch.rand(6, 2) * 2 - 1
    with torch.no_grad():
        target = torch.stack([n(grid).reshape(-1) + 0.3 for n in nets])
    data = WeightSpaceData.from_modules(
        nets,
        [i % 3 for i in range(60)],
        target=target,
        grid=grid,
        extras={"image": torch.rand(60, 3, 3)},
    )
    train, test = data.subset(range(48)), data.subset(range(48, 60))
    regression = []
    for part in (train, test):
        part = part.subset(range(len(part)))
        part.y = part.y.float() * 0.3 + 0.1 * torch.rand(len(part))
        regression.append(part)
    return {"classification": (train, test), "regression": tuple(regression)}


MODELS = {
    "ng_gnn": lambda out: NeuralGraphGNN(1, out, node_dim=8, num_layers=1),
    "ng_gnn_best_features": lambda out: NeuralGraphGNN(1, out, 8, config=QSTATS),
    "ng_t": lambda out: NeuralGraphTransformer(1, out, node_dim=8, num_layers=1),
    "flat": lambda out: FlatWeightsMLP(out, hidden=8),
    "flat_aug": lambda out: FlatWeightsMLP(out, augment=True, hidden=8),
    "statnn": lambda out: StatNN(out, hidden=8),
    "statnn_q": lambda out: StatNN(out, scaling="quantile", hidden=8),
    "statnn_gbt": lambda out: StatNNTrees(out, max_iter=8),
    "nfn": lambda out: NFNPredictor(out, hidden=4, layers=1),
    "probe": lambda out: ProbePredictor(out, num_probes=4, input_dim=2, hidden=8),
    "image": lambda out: ImagePredictor(out, hidden=8),
}
EDITORS = ("ng_gnn", "flat", "nfn")


def _fit(make, task, train):
    out = 3 if task == "classification" else 1
    trainer = WeightSpaceTrainer(make(out), task, epochs=2, batch_size=16)
    trainer.fit(train)
    return trainer


def _assert_same(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k
    else:
        assert torch.equal(a, b)


@pytest.mark.parametrize("task", ["classification", "regression"])
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_save_then_load_predicts_identically(splits, tmp_path, kind, task):
    train, test = splits[task]
    trainer = _fit(MODELS[kind], task, train)
    path = save_predictor(trainer, tmp_path / f"{kind}.safetensors")
    loaded = load_predictor(path)
    _assert_same(loaded.predict_raw(test), trainer.predict_raw(test))
    metrics = loaded.evaluate(test)
    assert metrics == trainer.evaluate(test)
    assert all(v == v for v in metrics.values())  # no NaN: a real comparison
    assert (loaded.task, loaded.y_mean, loaded.y_std) == (
        trainer.task,
        trainer.y_mean,
        trainer.y_std,
    )
    assert repr(loaded.model) == repr(trainer.model)
    if task == "regression":  # the label scaling is the fitted one, not 0 / 1
        assert loaded.y_std != 1.0


@pytest.mark.parametrize("kind", EDITORS)
def test_save_then_load_edits_identically(splits, tmp_path, kind):
    train, test = splits["classification"]
    trainer = _fit(MODELS[kind], "editing", train)
    loaded = load_predictor(save_predictor(trainer, tmp_path / "editor.safetensors"))
    _assert_same(loaded.predict_raw(test), trainer.predict_raw(test))
    assert torch.equal(loaded.predict(test), trainer.predict(test))


def _read(path):
    """``(JSON metadata, tensors)`` of a saved predictor, read directly."""
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["lopt"]), {k: f.get_tensor(k) for k in f.keys()}


def test_the_file_is_safetensors_with_readable_json(splits, tmp_path):
    train, _ = splits["regression"]
    trainer = _fit(MODELS["statnn_gbt"], "regression", train)
    path = save_predictor(trainer, tmp_path / "trees.safetensors")
    meta, tensors = _read(path)
    keys = set(tensors)
    assert meta["predictor"]["class"] == "StatNNTrees"
    assert meta["task"] == "regression" and meta["y_std"] == trainer.y_std
    assert {"trees.threshold", "trees.value", "mean", "std"} <= keys
    # A safetensors file: an 8-byte little-endian header length, then JSON.
    raw = path.read_bytes()
    header = int.from_bytes(raw[:8], "little")
    assert json.loads(raw[8 : 8 + header])["__metadata__"]


def test_trees_match_scikit_learn():
    from sklearn.ensemble import (
        HistGradientBoostingClassifier,
        HistGradientBoostingRegressor,
    )

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 4, generator=gen)
    x[::17, 2] = float("nan")  # missing values take the learned side
    labels = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    for fitted, target in (
        (HistGradientBoostingRegressor(max_iter=20), x[:, 0].nan_to_num()),
        (HistGradientBoostingClassifier(max_iter=20), labels),
        (HistGradientBoostingClassifier(max_iter=20), labels.clamp(max=1)),
    ):
        fitted.fit(x.numpy(), target.numpy())
        trees = TreeEnsemble().load_sklearn(fitted)
        out = trees(x)
        if hasattr(fitted, "predict_proba"):
            expected = torch.as_tensor(fitted.predict_proba(x.numpy()))
        else:
            expected = torch.as_tensor(fitted.predict(x.numpy()))
        torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-12)
        fresh = TreeEnsemble()
        fresh.load_state_dict(trees.state_dict())
        assert torch.equal(fresh(x), out)


@pytest.mark.parametrize("kind", ["statnn", "statnn_q", "flat", "image"])
def test_lazily_built_heads_load_into_fresh_instances(splits, kind):
    train, test = splits["classification"]
    fitted = _fit(MODELS[kind], "classification", train).model.eval()
    fresh = MODELS[kind](3).eval()
    assert fresh.head is None
    fresh.load_state_dict(fitted.state_dict())
    batch = list(range(len(test)))
    with torch.no_grad():
        expected = fitted(fitted.collate(test, batch))
        assert torch.equal(fresh(fresh.collate(test, batch)), expected)
    if kind.startswith("statnn"):
        assert fresh.per_layer == fitted.per_layer == 2


def test_mismatched_and_corrupt_files_fail_clearly(splits, tmp_path):
    train, _ = splits["classification"]
    trainer = _fit(MODELS["ng_gnn"], "classification", train)
    path = save_predictor(trainer, tmp_path / "model.safetensors")
    meta, tensors = _read(path)
    meta["predictor"]["model"]["config"]["node_dim"] = 16
    save_file(tensors, str(tmp_path / "other.safetensors"), {"lopt": json.dumps(meta)})
    with pytest.raises(ValueError, match="do not fit the GraphPredictor"):
        load_predictor(tmp_path / "other.safetensors")
    meta["predictor"]["model"]["class"] = "os.system"
    save_file(tensors, str(tmp_path / "evil.safetensors"), {"lopt": json.dumps(meta)})
    with pytest.raises(ValueError, match="Invalid predictor class 'os.system'"):
        load_predictor(tmp_path / "evil.safetensors")
    save_file(tensors, str(tmp_path / "bare.safetensors"))
    with pytest.raises(ValueError, match="not written by save_predictor"):
        load_predictor(tmp_path / "bare.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="not safetensors"):
        load_predictor(truncated)
    with pytest.raises(FileNotFoundError):
        load_predictor(tmp_path / "missing.safetensors")


def test_a_failed_save_leaves_the_old_file_and_no_temporary(
    splits, tmp_path, monkeypatch
):
    train, _ = splits["classification"]
    trainer = _fit(MODELS["statnn"], "classification", train)
    path = save_predictor(trainer, tmp_path / "model.safetensors")
    before = path.read_bytes()

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        save_predictor(trainer, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_only_fitted_library_predictors_save(splits, tmp_path):
    train, _ = splits["classification"]
    with pytest.raises(RuntimeError, match="call fit"):
        save_predictor(WeightSpaceTrainer(StatNN(3)), tmp_path / "x.safetensors")

    class Mine(StatNN):
        pass

    trainer = _fit(lambda out: Mine(out, hidden=4), "classification", train)
    with pytest.raises(TypeError, match="cannot save a Mine"):
        save_predictor(trainer, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_a_file_whose_json_lacks_entries_fails_naming_them(tmp_path):
    """The right format and version but no predictor description: a
    ``ValueError`` that names what is missing, not a ``KeyError``."""
    from safetensors.torch import save_file

    from lopt.weightspace.saving import _KEY, FORMAT_NAME, FORMAT_VERSION

    path = tmp_path / "partial.safetensors"
    meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "task": "x"}
    save_file(
        {"w": torch.zeros(1)},
        str(path),
        metadata={_KEY: json.dumps(meta)},
    )
    with pytest.raises(ValueError, match=r"lacks \['predictor', 'trainer'"):
        load_predictor(path)
