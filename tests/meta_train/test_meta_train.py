"""Meta-training: the smoke preset runs end to end, writes a loadable rule that
records its provenance, improves on its meta-objective, and resumes exactly."""

import json
import math
from dataclasses import replace

import pytest
import torch
from torch.nn.utils import parameters_to_vector

from lopt import NGOptimizer, load_rule
from lopt.tasks.families import MLPFamily, TaskConfig, input_scales, make_task
from meta_train import MetaTrainer, preset
from meta_train.__main__ import main
from meta_train.unroll import advance_inner, new_inner_state, truncated_unroll


def test_smoke_cli_writes_loadable_rule(tmp_path):
    assert main(["--preset", "smoke", "--out", str(tmp_path), "--no-progress"]) == 0
    rule_dir = tmp_path / "best_rule"
    config = json.loads((rule_dir / "config.json").read_text())
    provenance = config["provenance"]
    assert provenance["command"].startswith("python -m meta_train --preset smoke")
    assert math.isfinite(provenance["validation_score"])
    model = torch.nn.Linear(4, 2)
    opt = NGOptimizer(model.parameters(), rule=rule_dir)
    before = [p.clone() for p in model.parameters()]
    model(torch.randn(8, 4)).pow(2).mean().backward()
    opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert (tmp_path / "log.csv").read_text().count("\n") == 1 + preset(
        "smoke"
    ).iterations


@pytest.mark.parametrize(
    "estimator, warm_start", [("tbptt", (0, 0)), ("pes", (0, 0)), ("tbptt", (5, 20))]
)
def test_resume_reaches_the_same_weights(tmp_path, estimator, warm_start):
    config = preset("smoke", estimator=estimator, warm_start=warm_start)
    straight = MetaTrainer(config, tmp_path / "a")
    straight.train(progress=False)

    interrupted = MetaTrainer(config, tmp_path / "b")
    interrupted.train(progress=False, stop_after=4)  # a checkpoint was written at 4
    resumed = MetaTrainer(config, tmp_path / "b")
    resumed.load_checkpoint()
    assert resumed.iteration == 4
    resumed.train(progress=False)
    for name, value in straight.rule.state_dict().items():
        assert torch.equal(value, resumed.rule.state_dict()[name]), name


def test_pes_moves_the_rule(tmp_path):
    trainer = MetaTrainer(preset("smoke", estimator="pes", iterations=2), tmp_path)
    before = [p.clone() for p in trainer.rule.parameters()]
    trainer.train(progress=False)
    assert trainer.skipped == 0
    moved = [not torch.equal(a, b) for a, b in zip(before, trainer.rule.parameters())]
    assert all(moved)


def test_invalid_estimator():
    with pytest.raises(ValueError, match="Invalid estimator: 'sgd'"):
        preset("smoke", estimator="sgd")


def test_resume_rejects_other_config(tmp_path):
    MetaTrainer(preset("smoke"), tmp_path).train(progress=False, stop_after=2)
    other = MetaTrainer(preset("smoke", seed=5), tmp_path)
    with pytest.raises(ValueError, match="another configuration"):
        other.load_checkpoint()


def test_truncated_unroll_meta_gradient_reaches_rule():
    from lopt import UpdateRule

    rule = UpdateRule()
    gen = torch.Generator().manual_seed(0)
    inner = new_inner_state(MLPFamily(widths=(8,), max_depth=1), gen, (20, 20))
    loss, new_inner, diverged = truncated_unroll(rule, inner, 3, gen)
    loss.backward()
    assert not diverged
    assert new_inner.step == 3 and not new_inner.params.requires_grad
    grads = [p.grad for p in rule.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("kind", ["mlp", "conv1d"])
def test_task_config_json_round_trip_rebuilds_same_task(kind):
    config = MLPFamily(conv_prob=1.0 if kind == "conv1d" else 0.0).sample(
        torch.Generator().manual_seed(3)
    )
    assert config.kind == kind
    again = TaskConfig.from_json(json.loads(json.dumps(config.to_json())))
    assert again == config
    a = make_task(config).make_model(config.seed)
    b = make_task(again).make_model(again.seed)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)


def test_best_rule_loads_with_metadata(tmp_path):
    MetaTrainer(preset("smoke"), tmp_path).train(progress=False)
    rule = load_rule(tmp_path / "best_rule")
    assert rule.metadata["iteration"] >= 1


def test_init_rule_starts_from_saved_weights(tmp_path):
    first = MetaTrainer(preset("smoke"), tmp_path / "a")
    first.train(progress=False)
    start = MetaTrainer(
        preset("smoke", init_rule=str(tmp_path / "a" / "last_rule")), tmp_path / "b"
    )
    for name, value in first.rule.state_dict().items():
        assert torch.equal(value, start.rule.state_dict()[name]), name
    assert "command" in start.rule.metadata["fine_tuned_from"]


def test_fine_tune_validates_its_starting_rule_first(tmp_path):
    from meta_train.trainer import validate

    first = MetaTrainer(preset("smoke"), tmp_path / "a")
    first.train(progress=False)
    config = preset("smoke", init_rule=str(tmp_path / "a" / "last_rule"))
    tuner = MetaTrainer(config, tmp_path / "b")
    expected = validate(
        load_rule(tmp_path / "a" / "last_rule"),
        tuner.val_configs,
        config.val_steps,
        config.val_metric,
    )
    tuner.train(progress=False)
    rows = (tmp_path / "b" / "log.csv").read_text().splitlines()
    assert len(rows) == 2 + config.iterations
    iteration, *_, val_score, _ = rows[1].split(",")
    assert iteration == "0" and float(val_score) == pytest.approx(expected)
    best = load_rule(tmp_path / "b" / "best_rule")
    assert best.metadata["validation_score"] <= expected


def test_torchrun_two_workers_all_reduce_meta_gradients(tmp_path):
    """2 processes (gloo): each unrolls its own tasks, the all-reduced
    meta-gradients keep their rules identical, and differ from one worker alone."""
    import subprocess
    import sys

    out = tmp_path / "dist"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "-m",
        "meta_train",
        "--preset",
        "smoke",
        "--out",
        str(out),
        "--no-progress",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    ranks = [
        torch.load(out / name, weights_only=True)
        for name in ("checkpoint.pt", "checkpoint-rank1.pt")
    ]
    rule0, rule1 = ranks[0]["rule"], ranks[1]["rule"]
    assert all(torch.equal(rule0[k], rule1[k]) for k in rule0)
    tasks = [r["inner"][0]["state"]["config"] for r in ranks]
    assert tasks[0] != tasks[1]
    alone = MetaTrainer(preset("smoke"), tmp_path / "alone")
    alone.train(progress=False)
    single = alone.rule.state_dict()
    assert any(not torch.equal(rule0[k], single[k]) for k in rule0)


def test_select_flags_a_diverging_rule_and_ranks(tmp_path, capsys):
    from lopt import RuleConfig, UpdateRule, save_rule
    from meta_train.select import main as select_main
    from meta_train.select import run_task

    config = MLPFamily(widths=(8,), max_depth=1, conv_prob=0.0).sample(
        torch.Generator().manual_seed(0)
    )
    huge = UpdateRule(RuleConfig(step_scale=50.0))  # Adam with lr 50
    assert run_task(huge, config, 40)[0]
    diverged, score = run_task(None, config, 40)
    assert not diverged and score < 0
    save_rule(huge, tmp_path / "huge")
    save_rule(UpdateRule(), tmp_path / "adamlike")
    argv = [str(tmp_path / "huge"), str(tmp_path / "adamlike"), "--tasks", "1"]
    assert select_main([*argv, "--steps", "30", "--max-width", "16"]) == 0
    ranking = capsys.readouterr().out.split("ranking")[1].splitlines()
    assert "huge" in ranking[-1] and "1 diverged" in ranking[-1]
    # --task-seeds: each task from several seeds, each one counted
    argv += ["--steps", "30", "--max-width", "16", "--task-seeds", "2"]
    assert select_main(argv) == 0
    out = capsys.readouterr().out
    seeds = [line.rsplit("seed=", 1)[1] for line in out.splitlines() if "task:" in line]
    assert len(seeds) == 2 and int(seeds[1]) == int(seeds[0]) + 1000
    assert "diverged 2/2" in out.split("ranking")[0]


def test_final_validation_metric_and_val_family(tmp_path):
    """val_metric="final" scores log(L_final / L_0), diverged runs log 10;
    val_family widens the validation tasks only."""
    from meta_train.evaluate import DIVERGED_SCORE, final_log_ratio

    assert final_log_ratio([2.0] + [1.0] * 9, diverged=False) == pytest.approx(
        math.log(0.5)
    )
    assert final_log_ratio([1.0, 50.0], diverged=True) == DIVERGED_SCORE
    config = preset(
        "smoke",
        iterations=2,
        val_every=2,
        val_metric="final",
        val_family={"widths": [64], "max_depth": 1, "conv_prob": 0.0},
    )
    trainer = MetaTrainer(config, tmp_path / "run")
    assert all(c.hidden == (64,) for c in trainer.val_configs)
    assert all(max(c.hidden) <= 16 for c in [trainer.family.sample(trainer.generator)])
    trainer.train(progress=False)
    provenance = load_rule(tmp_path / "run" / "best_rule").metadata
    assert "last 10%" in provenance["validation_metric"]
    assert provenance["validation_score"] < 0  # a smoke run still learns a bit
    with pytest.raises(ValueError, match="Invalid val_metric: 'mean'"):
        preset("smoke", val_metric="mean")


def test_family_min_depth_zero_gives_linear_models():
    family = MLPFamily(min_depth=0, max_depth=1, conv_prob=1.0)
    gen = torch.Generator().manual_seed(0)
    configs = [family.sample(gen) for _ in range(40)]
    depths = {len(c.hidden) for c in configs}
    assert depths == {0, 1}
    linear = next(c for c in configs if not c.hidden)
    assert linear.kind == "mlp"  # a 0-layer CNN is not a thing
    model = make_task(linear).make_model(linear.seed)
    assert [p.dim() for p in model.parameters()] == [2, 1]
    # The default family is unchanged (same stream of depths as before).
    default = MLPFamily()
    gen = torch.Generator().manual_seed(0)
    assert all(1 <= len(default.sample(gen).hidden) <= 3 for _ in range(20))
    with pytest.raises(ValueError, match="Invalid depths"):
        MLPFamily(min_depth=3, max_depth=2).sample(gen)


@pytest.mark.parametrize("estimator", ["tbptt", "pes"])
def test_train_only_changes_only_the_named_parameters(tmp_path, estimator):
    config = preset(
        "smoke",
        iterations=2,
        val_every=100,
        estimator=estimator,
        train_only=("edge_head.out", "slot_head.skip"),
    )
    trainer = MetaTrainer(config, tmp_path / "run")
    before = {n: p.detach().clone() for n, p in trainer.rule.named_parameters()}
    trainer.train(progress=False)
    changed = {
        n for n, p in trainer.rule.named_parameters() if not torch.equal(p, before[n])
    }
    assert changed and changed <= {
        "edge_head.out.weight",
        "edge_head.out.bias",
        "slot_head.skip.weight",
    }
    with pytest.raises(ValueError, match="Invalid train_only prefix 'heads'"):
        MetaTrainer(preset("smoke", train_only=("heads",)), tmp_path / "other")


def test_advance_inner_trains_without_meta_gradient_and_extends_horizon():
    from lopt import RuleConfig, UpdateRule

    rule = UpdateRule(RuleConfig(step_scale=1e-2))  # Adam(1e-2) before training
    gen = torch.Generator().manual_seed(0)
    family = MLPFamily(widths=(16,), max_depth=1, conv_prob=0.0)
    inner = new_inner_state(family, gen, (20, 20))
    warm, diverged = advance_inner(rule, inner, 60, gen)
    assert not diverged
    assert (warm.step, warm.horizon) == (60, 80)
    assert not warm.params.requires_grad and int(warm.opt_state.step) == 60
    assert all(p.grad is None for p in rule.parameters())
    batch = inner.task.sample_batch(torch.Generator().manual_seed(1))
    loss = inner.task.functional_loss
    before = loss(inner.model, inner.graph.unflatten(inner.params), batch)
    after = loss(warm.model, warm.graph.unflatten(warm.params), batch)
    assert float(after) < 0.8 * float(before)
    # A warm start that blows up reports it and leaves the task untouched.
    huge = UpdateRule(RuleConfig(step_scale=50.0))
    same, diverged = advance_inner(huge, inner, 60, gen)
    assert diverged and same is inner and inner.step == 0


def test_warm_start_slots_begin_deep_into_training(tmp_path):
    trainer = MetaTrainer(preset("smoke", warm_start=(12, 25)), tmp_path)
    trainer.meta_step()
    truncation = trainer.config.truncation
    assert all(inner.step >= 12 + truncation for inner in trainer.inner)
    assert any(inner.step > 12 + truncation for inner in trainer.inner)


@pytest.mark.parametrize("warm_start", [(-1, 10), (20, 10), (0, 10)])
def test_invalid_warm_start(warm_start):
    with pytest.raises(ValueError, match="Invalid warm_start"):
        preset("smoke", warm_start=warm_start)


def test_warm_finetune_preset_starts_from_stage_one(tmp_path):
    """The shipped rule's second stage fine-tunes the first stage's best rule
    (runs/default/best_rule by default) and says so when it is missing."""
    config = preset("warm_finetune")
    assert config.init_rule == "runs/default/best_rule"
    assert config.warm_start[1] >= 5000 and config.rule == preset("default").rule
    with pytest.raises(FileNotFoundError):
        MetaTrainer(replace(config, init_rule=str(tmp_path / "none")), tmp_path)
    smoke = preset("smoke", rule={"degree_features": True})
    MetaTrainer(smoke, tmp_path / "a").train(progress=False)
    small = replace(
        smoke,
        init_rule=str(tmp_path / "a" / "best_rule"),
        warm_start=(5, 20),
    )
    stage2 = MetaTrainer(small, tmp_path / "b")
    assert torch.equal(
        parameters_to_vector(stage2.rule.parameters()),
        parameters_to_vector(load_rule(tmp_path / "a" / "best_rule").parameters()),
    )


def test_transplant_copies_matching_parameters_and_initialises_the_rest():
    from lopt.optim.rule import RuleConfig, UpdateRule
    from meta_train.trainer import transplant

    torch.manual_seed(0)
    source = UpdateRule(RuleConfig(node_dim=8, edge_dim=4, head_hidden=4))
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p))
    lean = RuleConfig(
        node_dim=8, edge_dim=4, head_hidden=4, edge_mlp=False, edge_head_hidden=0
    )
    rule = transplant(source, lean)
    theirs, ours = source.state_dict(), rule.state_dict()
    assert "backbone.edge_encoder.weight" in rule.metadata["transplanted"]
    # same shapes here, other roles: the head reads the edge embedding, the
    # node projections add to it directly
    for name in ("edge_head.out.weight", "backbone.layers.0.edge_src.weight"):
        assert name in rule.metadata["initialised"]
    for name in rule.metadata["transplanted"]:
        assert torch.equal(ours[name], theirs[name])
    assert not ours["edge_head.out.weight"].any()  # fresh: zero, as an untrained head
    # other widths: only the width-free skip paths and output biases carry over
    narrow = transplant(source, RuleConfig(node_dim=3, edge_dim=2, head_hidden=2))
    assert narrow.metadata["transplanted"] == [
        "edge_head.out.bias",
        "edge_head.skip.weight",
        "slot_head.out.bias",
        "slot_head.skip.weight",
    ]


def test_recurrent_and_unscaled_tasks():
    """The broad family's kinds: GRUs and LSTMs reading the features as a
    sequence, and inputs multiplied by fixed per-feature factors."""
    from dataclasses import replace

    from lopt.graph import NeuralGraph
    from lopt.optim.functional import init_state, ng_step
    from lopt.optim.rule import UpdateRule

    base = TaskConfig("mnist1d", (12,), "tanh", 1.0, 16, seed=3, kind="gru")
    for kind in ("gru", "lstm"):
        task = make_task(replace(base, kind=kind))
        model = task.make_model(base.seed)
        assert model.rnn.input_size == 40 // 8
        batch = task.sample_batch(torch.Generator().manual_seed(0))
        params = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
        loss = task.functional_loss(model, params, batch)
        grads = torch.autograd.grad(loss, params)
        assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
        # the optimizer steps it like any other task
        graph = NeuralGraph.from_shapes([p.shape for p in params])
        flat, _ = ng_step(
            UpdateRule(), graph, graph.flatten(params), graph.flatten(grads),
            init_state(graph),
        )  # fmt: skip
        assert torch.isfinite(flat).all()
    with pytest.raises(ValueError, match="one hidden width"):
        make_task(replace(base, hidden=(8, 8)))

    plain = make_task(replace(base, kind="mlp"))
    spread_config = replace(base, kind="mlp", input_spread=2.0)
    spread = make_task(spread_config)
    scales = input_scales(spread_config, 40)
    assert scales.min() < 0.1 and scales.max() > 10 and scales.max() <= 100
    xp, _ = plain.sample_batch(torch.Generator().manual_seed(0))
    xs, _ = spread.sample_batch(torch.Generator().manual_seed(0))
    torch.testing.assert_close(xs, xp * scales)
    torch.testing.assert_close(spread.data.x_test, plain.data.x_test * scales)
    # the factors are part of the task: the same config gives the same ones
    again = make_task(replace(base, input_spread=2.0))
    assert torch.equal(again.data.x_train, spread.data.x_train)
    config = replace(base, input_spread=2.0)
    assert TaskConfig.from_json(config.to_json()) == config


def test_broad_family_adds_kinds_and_keeps_the_default_stream():
    family = MLPFamily(recurrent_prob=0.5, unscaled_prob=0.5, min_depth=0)
    gen = torch.Generator().manual_seed(0)
    configs = [family.sample(gen) for _ in range(40)]
    kinds = {c.kind for c in configs}
    assert {"gru", "lstm"} <= kinds
    assert all(len(c.hidden) == 1 for c in configs if c.kind in ("gru", "lstm"))
    assert any(c.input_spread for c in configs)
    assert any(not c.input_spread for c in configs)
    # Without them a family samples exactly the tasks it sampled before they
    # existed (the first task of select's seed 31000, as in its logs).
    first = MLPFamily(widths=(16, 32, 64, 128, 256)).sample(
        torch.Generator().manual_seed(31000)
    )
    assert (first.dataset, first.hidden, first.seed) == ("digits", (16,), 821809776)


def test_select_broad_family(tmp_path, capsys):
    from lopt import UpdateRule, save_rule
    from meta_train.select import main as select_main

    save_rule(UpdateRule(), tmp_path / "adamlike")
    argv = [str(tmp_path / "adamlike"), "--tasks", "6", "--steps", "3"]
    argv += ["--family", "broad", "--seed", "1", "--max-width", "16"]
    assert select_main(argv) == 0
    out = capsys.readouterr().out
    tasks = [line for line in out.splitlines() if line.startswith("task:")]
    assert len(tasks) == 6
    assert any(" gru " in t or " lstm " in t for t in tasks)
