"""UpdateRule: outputs, Adam initialisation, rule files, the shipped rule."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pickle
import re
import shutil

import pytest
import torch
from conftest import TINY_CONFIG, mlp, random_rule, regression_data, train
from torch import nn

import lopt
from lopt import NeuralGraph, NGOptimizer, RuleConfig, UpdateRule, load_rule, save_rule
from lopt.optim.features import (
    NUM_TIME_FEATURES,
    init_feature_state,
    scalar_features,
    time_features,
    update_feature_state,
)
from lopt.optim.rule import CONFIG_FILE, FORMAT_VERSION, WEIGHTS_FILE


def _inputs(seed=0):
    graph = NeuralGraph.from_parameters(mlp().parameters())
    gen = torch.Generator().manual_seed(seed)
    grad = torch.randn(graph.num_scalars, generator=gen)
    state = update_feature_state(init_feature_state(graph.num_scalars), grad)
    param = torch.randn(graph.num_scalars, generator=gen)
    return graph, scalar_features(graph, param, grad, state), time_features(state.step)


def test_output_shape_and_repr():
    rule = UpdateRule(TINY_CONFIG)
    graph, feats, time = _inputs()
    assert time.shape == (NUM_TIME_FEATURES,)
    assert rule(graph, feats, time).shape == (graph.num_scalars,)
    assert repr(TINY_CONFIG) in repr(rule)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"node_dim": 0}, "Invalid node_dim: 0"),
        ({"num_layers": -1}, "Invalid num_layers: -1"),
        ({"edge_dim": 2.5}, "Invalid edge_dim: 2.5"),
        ({"step_scale": 0.0}, "Invalid step_scale: 0.0"),
        ({"magnitude_clip": float("inf")}, "Invalid magnitude_clip: inf"),
        ({"edge_mlp": 0}, "Invalid edge_mlp: 0"),
        ({"edge_head_hidden": -1}, "Invalid edge_head_hidden: -1"),
        ({"edge_head_hidden": 2.0}, "Invalid edge_head_hidden: 2.0"),
    ],
)
def test_invalid_config(kwargs, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        RuleConfig(**kwargs)


def test_untrained_rule_is_adam():
    """Two routes to the same maths: an untrained rule and torch.optim.Adam."""
    x, y = regression_data()
    models = [mlp(), mlp()]
    opts = [
        NGOptimizer(models[0].parameters(), rule=UpdateRule(TINY_CONFIG)),
        torch.optim.Adam(models[1].parameters(), lr=TINY_CONFIG.step_scale, eps=0.0),
    ]
    for _ in range(5):
        for model, opt in zip(models, opts):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_randomised_rule_is_not_adam():
    graph, feats, time = _inputs()
    adam = UpdateRule(TINY_CONFIG)(graph, feats, time)
    assert not torch.allclose(random_rule()(graph, feats, time), adam, atol=1e-5)


# ----------------------------------------------------------------- rule files
def test_save_load_round_trip(tmp_path):
    rule = random_rule(seed=4)
    save_rule(rule, tmp_path / "rule")
    loaded = load_rule(tmp_path / "rule")
    assert loaded.config == rule.config
    graph, feats, time = _inputs()
    assert torch.equal(loaded(graph, feats, time), rule(graph, feats, time))
    # The config file path works as well as its directory.
    again = load_rule(tmp_path / "rule" / CONFIG_FILE)
    assert torch.equal(again(graph, feats, time), rule(graph, feats, time))


def test_provenance_round_trip(tmp_path):
    rule = random_rule()
    rule.metadata = {"note": "from metadata", "commit": "old"}
    provenance = {"commit": "abc123", "val_score": 0.25, "config": {"steps": [1, 2]}}
    save_rule(rule, tmp_path, provenance=provenance)
    loaded = load_rule(tmp_path)
    assert loaded.metadata == {"note": "from metadata", **provenance}
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert config["format_version"] == FORMAT_VERSION
    assert config["provenance"]["commit"] == "abc123"


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="No rule at .*: missing config.json"):
        load_rule(tmp_path / "nowhere")


def test_missing_weights(tmp_path):
    save_rule(random_rule(), tmp_path)
    (tmp_path / WEIGHTS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="missing weights.safetensors"):
        load_rule(tmp_path)


def test_corrupted_weights(tmp_path):
    save_rule(random_rule(), tmp_path)
    gen = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, (2000,), generator=gen, dtype=torch.uint8)
    (tmp_path / WEIGHTS_FILE).write_bytes(bytes(noise.tolist()))
    with pytest.raises(ValueError, match="corrupted"):
        load_rule(tmp_path)


def test_truncated_weights(tmp_path):
    save_rule(random_rule(), tmp_path)
    data = (tmp_path / WEIGHTS_FILE).read_bytes()
    (tmp_path / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupted"):
        load_rule(tmp_path)


def _damage_values(path):
    """Flip one byte of the tensor data, leaving the safetensors header (its
    length prefix and JSON) intact: the file still parses."""
    data = bytearray((path / WEIGHTS_FILE).read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    data[8 + header_len + 5] ^= 0x40
    (path / WEIGHTS_FILE).write_bytes(bytes(data))


def test_config_records_the_weights_checksum(tmp_path):
    save_rule(random_rule(), tmp_path)
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    digest = hashlib.sha256((tmp_path / WEIGHTS_FILE).read_bytes()).hexdigest()
    assert config["weights_sha256"] == digest


def test_damaged_weight_values_are_detected(tmp_path):
    """A header-intact file with changed values parses; only the checksum
    catches it."""
    save_rule(random_rule(), tmp_path)
    _damage_values(tmp_path)
    with pytest.raises(ValueError, match="corrupted: their SHA-256 is"):
        load_rule(tmp_path)


def test_damaged_shipped_rule_is_refused_by_the_optimizer(tmp_path):
    shutil.copytree(lopt.default_rule_path(), tmp_path / "rule")
    _damage_values(tmp_path / "rule")
    with pytest.raises(ValueError, match="corrupted: their SHA-256 is"):
        NGOptimizer(mlp().parameters(), rule=tmp_path / "rule")


def test_version_2_config_without_checksum(tmp_path):
    save_rule(random_rule(), tmp_path)
    _edit_config(tmp_path, lambda c: c.pop("weights_sha256"))
    with pytest.raises(ValueError, match="has no weights_sha256 checksum"):
        load_rule(tmp_path)


def test_version_1_rule_loads_with_a_warning(tmp_path):
    """Rules saved before checksums existed still load, flagged as unverified."""
    rule = random_rule()
    save_rule(rule, tmp_path)

    def downgrade(config):
        config.pop("weights_sha256")
        config["format_version"] = 1

    _edit_config(tmp_path, downgrade)
    with pytest.warns(UserWarning, match="records no checksum"):
        loaded = load_rule(tmp_path)
    graph, feats, time = _inputs()
    assert torch.equal(loaded(graph, feats, time), rule(graph, feats, time))


def test_loading_a_rule_leaves_the_global_rng_alone(tmp_path):
    save_rule(random_rule(), tmp_path)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    load_rule(tmp_path)
    assert torch.equal(torch.get_rng_state(), before)


def test_invalid_json(tmp_path):
    save_rule(random_rule(), tmp_path)
    (tmp_path / CONFIG_FILE).write_text('{"format": "lopt-rule", ')
    with pytest.raises(ValueError, match="is not valid JSON"):
        load_rule(tmp_path)


def _edit_config(path, edit):
    config = json.loads((path / CONFIG_FILE).read_text())
    edit(config)
    (path / CONFIG_FILE).write_text(json.dumps(config))


def test_not_a_rule_config(tmp_path):
    save_rule(random_rule(), tmp_path)
    _edit_config(tmp_path, lambda c: c.pop("format"))
    with pytest.raises(ValueError, match="is not an lopt rule config"):
        load_rule(tmp_path)


def test_wrong_format_version(tmp_path):
    save_rule(random_rule(), tmp_path)
    _edit_config(tmp_path, lambda c: c.update(format_version=FORMAT_VERSION + 1))
    message = re.escape("has format version 4; this lopt reads versions [1, 2, 3]")
    with pytest.raises(ValueError, match=message):
        load_rule(tmp_path)


def test_other_feature_set(tmp_path):
    save_rule(random_rule(), tmp_path)
    _edit_config(tmp_path, lambda c: c["features"].update(time_scales=[1.0]))
    with pytest.raises(ValueError, match="was trained on features"):
        load_rule(tmp_path)


def test_unknown_config_key(tmp_path):
    save_rule(random_rule(), tmp_path)
    _edit_config(tmp_path, lambda c: c["rule_config"].update(width=3))
    with pytest.raises(ValueError, match="has an invalid rule_config"):
        load_rule(tmp_path)


def test_weights_that_do_not_match_config(tmp_path):
    save_rule(random_rule(config=RuleConfig(edge_dim=4)), tmp_path)
    _edit_config(tmp_path, lambda c: c["rule_config"].update(edge_dim=8))
    with pytest.raises(ValueError, match="config expects"):
        load_rule(tmp_path)


def test_weights_with_missing_layers(tmp_path):
    save_rule(random_rule(config=RuleConfig(num_layers=1)), tmp_path)
    _edit_config(tmp_path, lambda c: c["rule_config"].update(num_layers=2))
    with pytest.raises(ValueError, match="do not match its config: missing"):
        load_rule(tmp_path)


def test_non_finite_weight(tmp_path):
    rule = random_rule()
    with torch.no_grad():
        rule.edge_head.out.weight[0, 0] = float("nan")
    save_rule(rule, tmp_path)
    with pytest.raises(ValueError, match="edge_head.out.weight is not finite"):
        load_rule(tmp_path)


def test_loading_never_unpickles(tmp_path, monkeypatch):
    rule = random_rule()
    save_rule(rule, tmp_path)

    def forbidden(*args, **kwargs):
        raise AssertionError("loading a rule must not unpickle")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    loaded = load_rule(tmp_path)
    load_rule(lopt.default_rule_path())
    graph, feats, time = _inputs()
    assert torch.equal(loaded(graph, feats, time), rule(graph, feats, time))


def test_save_overwrites_in_place(tmp_path):
    save_rule(random_rule(seed=1), tmp_path)
    save_rule(random_rule(seed=2), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    graph, feats, time = _inputs()
    expected = random_rule(seed=2)(graph, feats, time)
    assert torch.equal(load_rule(tmp_path)(graph, feats, time), expected)


# --------------------------------------------------------------- shipped rule
def test_default_rule_loads():
    rule = load_rule(lopt.default_rule_path())
    assert isinstance(rule, UpdateRule)
    assert isinstance(NGOptimizer(mlp().parameters()).rule, UpdateRule)


def test_default_rule_trains_a_small_cnn():
    datasets = pytest.importorskip("sklearn.datasets")
    images, labels = datasets.load_digits(return_X_y=True)
    x = torch.tensor(images[:256], dtype=torch.float32).view(-1, 1, 8, 8) / 16
    y = torch.tensor(labels[:256])
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16, 10),
    )
    opt = NGOptimizer(model.parameters(), rule=lopt.default_rule_path())
    losses = train(model, opt, x, y, 100, nn.functional.cross_entropy)
    assert losses[-1] < 0.75 * losses[0], losses[::10]


def test_dense_graph_leaves_out_zero_kernel_attributes_without_changing_updates():

    from lopt.optim.features import NUM_FEATURES, NUM_TIME_FEATURES

    graph = NeuralGraph.from_parameters(mlp(sizes=(5, 7, 3)).parameters())
    assert graph.kernel_attr is None
    rule = random_rule()
    feats = torch.randn(NUM_FEATURES, graph.num_scalars)
    time = torch.randn(NUM_TIME_FEATURES)
    full = dataclasses.replace(graph, kernel_attr=graph.edge_attr)
    torch.testing.assert_close(rule(graph, feats, time), rule(full, feats, time))


# ------------------------------------------------------------ degree features
DEGREE_CONFIG = RuleConfig(
    node_dim=8, edge_dim=4, num_layers=1, head_hidden=4, degree_features=True
)


def test_log_degree_counts_fan_in_and_fan_out():
    # mlp(): 4 inputs -> 6 hidden -> 3 outputs.
    graph = NeuralGraph.from_parameters(mlp().parameters())
    degree = graph.log_degree.expm1().round().long()
    fan_in, fan_out = degree[:, 0].tolist(), degree[:, 1].tolist()
    assert fan_in == [0] * 4 + [4] * 6 + [6] * 3
    assert fan_out == [6] * 4 + [3] * 6 + [0] * 3


def test_degree_rule_sees_width():
    """With degree features the same per-edge inputs give different updates in a
    wider layer; a rule without them cannot tell (mean aggregation)."""
    narrow, wide = mlp(sizes=(4, 6, 3)), mlp(sizes=(4, 60, 3))
    rule = random_rule(seed=1, config=DEGREE_CONFIG)
    outs = []
    for model in (narrow, wide):
        graph = NeuralGraph.from_parameters(model.parameters())
        # Every scalar gets the same features: only the graph differs.
        feats = torch.full(
            (len(lopt.optim.features.FEATURE_NAMES), graph.num_scalars), 0.3
        )
        outs.append(rule(graph, feats, time_features(torch.tensor(3.0)))[0])
    assert not torch.allclose(outs[0], outs[1])


def test_degree_rule_round_trip_and_invalid_flag(tmp_path):
    rule = random_rule(seed=2, config=DEGREE_CONFIG)
    save_rule(rule, tmp_path / "rule")
    loaded = load_rule(tmp_path / "rule")
    assert loaded.config.degree_features
    graph, feats, time = _inputs()
    assert torch.equal(loaded(graph, feats, time), rule(graph, feats, time))
    with pytest.raises(ValueError, match="Invalid degree_features: 1"):
        RuleConfig(degree_features=1)


def test_untrained_degree_rule_is_still_adam():
    graph, feats, time = _inputs()
    torch.testing.assert_close(
        UpdateRule(DEGREE_CONFIG)(graph, feats, time),
        UpdateRule(TINY_CONFIG)(graph, feats, time),
    )


# ------------------------------------------------------------------ lean rule
LEAN_CONFIG = dataclasses.replace(DEGREE_CONFIG, edge_mlp=False, edge_head_hidden=0)


def test_untrained_lean_rule_is_still_adam():
    graph, feats, time = _inputs()
    torch.testing.assert_close(
        UpdateRule(LEAN_CONFIG)(graph, feats, time),
        UpdateRule(TINY_CONFIG)(graph, feats, time),
    )


def test_lean_rule_round_trip_and_edge_embedding_reaches_the_update(tmp_path):
    rule = random_rule(seed=6, config=LEAN_CONFIG)
    assert rule.config.edge_hidden == 0 and not hasattr(rule.edge_head, "embed_in")
    assert rule.slot_head.hidden == LEAN_CONFIG.head_hidden  # slots keep their MLP
    save_rule(rule, tmp_path / "lean")
    loaded = load_rule(tmp_path / "lean")
    graph, feats, time = _inputs()
    out = rule(graph, feats, time)
    assert torch.equal(loaded(graph, feats, time), out)
    with torch.no_grad():
        rule.edge_head.out.weight.zero_()
    changed = rule(graph, feats, time)
    edges = graph.num_edges
    assert not torch.allclose(changed[:edges], out[:edges])
    assert torch.equal(changed[edges:], out[edges:])


def test_blend_with_untrained_interpolates_the_heads_outputs():
    """alpha = 1 is the rule, 0 its untrained ablation, and in between the
    heads output the same mix of the two (they are linear in the blended
    weights)."""
    from lopt.optim.rule import blend_with_untrained

    rule = random_rule(seed=3)
    fresh = UpdateRule(rule.config)
    assert blend_with_untrained(rule, 0.0).learned_output_is_zero
    assert not blend_with_untrained(rule, 1.0).learned_output_is_zero
    graph, feats, time = _inputs()
    torch.testing.assert_close(
        blend_with_untrained(rule, 1.0)(graph, feats, time), rule(graph, feats, time)
    )
    half = blend_with_untrained(rule, 0.5)
    gen = torch.Generator().manual_seed(0)
    for name in ("edge_head", "slot_head"):
        head = getattr(rule, name)
        width = head.out.in_features if not head.hidden else head.embed_in.in_features
        embed = torch.randn(width, 7, generator=gen)
        x = torch.randn(feats.shape[0], 7, generator=gen)
        want = 0.5 * head(embed, x) + 0.5 * getattr(fresh, name)(embed, x)
        torch.testing.assert_close(getattr(half, name)(embed, x), want)
    assert half.step_size == rule.step_size and half.config == rule.config


@pytest.mark.parametrize("alpha", [-0.1, 1.5, "half"])
def test_blend_with_untrained_rejects_bad_alpha(alpha):
    from lopt.optim.rule import blend_with_untrained

    with pytest.raises(ValueError, match="Invalid alpha"):
        blend_with_untrained(random_rule(), alpha)
