"""Tests of the benchmark package: the suite, the curve arithmetic and the three
commands, each run end to end on a tiny configuration into a temporary folder."""

from __future__ import annotations

import dataclasses
import json
import math
import sys

import numpy as np
import pytest
import torch

from benchmarks.common.report import format_lr, markdown_table
from benchmarks.optim import compare, curves, import_time, overhead, scaling
from benchmarks.optim.optimizers import (
    BASELINES,
    PEER_SPECS,
    PEERS,
    MissingPeerError,
    OptimizerConfig,
    lr_grid,
    parse_peers,
)
from benchmarks.optim.plotting import ENTRY_COLORS, ENTRY_STYLES
from benchmarks.optim.protocol import Protocol, execute, loss_outcome, summarise_task
from benchmarks.optim.training import train
from lopt import RuleConfig, UpdateRule, save_rule
from lopt.tasks.suite import TASKS, Task, get_tasks

torch.set_num_threads(1)

ENTRIES = (
    "ng",
    "untrained",
    "adam_default",
    *PEERS,
    "adam_tuned",
    "adamw_tuned",
    "sgd_tuned",
)
PEER_LABELS = ("Prodigy", "SF-AdamW", "LDoG")


def _table_rows(markdown: str, first_cell: str) -> list[str]:
    return [
        line for line in markdown.splitlines() if line.startswith(f"| {first_cell} |")
    ]


def _check_png(path) -> None:
    assert path.is_file()
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 1000


# ------------------------------------------------------------------------ suite
def test_suite_has_held_out_tasks():
    assert len(TASKS) >= 8
    with pytest.raises(ValueError, match="Invalid task: nope"):
        get_tasks(["nope"])


@pytest.mark.parametrize("name", list(TASKS))
def test_task_is_seeded_and_finite(name):
    task = TASKS[name]
    a, b = task.make_model(3), task.make_model(3)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    x1, y1 = task.sample_batch(task.batch_generator(5))
    x2, y2 = task.sample_batch(task.batch_generator(5))
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert len(x1) == task.batch_size
    loss = task.loss(a, (x1, y1))
    assert loss.ndim == 0 and torch.isfinite(loss)
    held_out = task.evaluate(a)
    assert set(held_out) == {"metric", "loss"}
    assert all(math.isfinite(v) for v in held_out.values())


# ----------------------------------------------------------------------- curves
def test_smoothing_and_final_loss():
    losses = [4.0, 2.0, 3.0, 1.0]
    np.testing.assert_allclose(curves.smooth(losses, 2), [4.0, 3.0, 2.5, 2.0])
    assert curves.final_loss(losses, 2) == 2.0
    assert curves.smoothing_window(1000) == 50
    assert curves.smoothing_window(10) == 1


def test_speedup_counts_steps_to_ng_final_loss():
    ng = np.array([3.0, 2.0, 1.0, 1.0])
    slow = np.array([3.0, 2.5, 2.0, 1.5, 1.2, 1.0, 0.9, 0.8])
    s = curves.speedup(ng, slow, total_steps=8)
    assert (s.value, s.censored, s.ng_steps, s.baseline_steps) == (2.0, False, 3, 6)
    assert s.to_baseline_final is None  # NG never gets down to 0.8
    never = curves.speedup(ng, np.array([3.0, 2.9, 2.8]), total_steps=8)
    assert never.censored and never.value == pytest.approx(8 / 3)
    assert never.to_baseline_final is None  # the baseline stopped early
    short = curves.speedup(ng, np.array([3.0, 2.5, 2.2, 2.0]), total_steps=4)
    assert short.censored and short.to_baseline_final == 4 / 2


def test_subsample_keeps_means():
    steps, values = curves.subsample(np.arange(1.0, 11.0), points=5)
    assert steps == [2, 4, 6, 8, 10]
    assert values == [1.5, 3.5, 5.5, 7.5, 9.5]


def test_formatting():
    assert [format_lr(x) for x in lr_grid("adam", 9)[:3]] == ["1e-4", "3.2e-4", "1e-3"]
    assert lr_grid("sgd", 5) == (1e-3, 1e-2, 1e-1, 1.0, 10.0)
    table = markdown_table(["a", "b"], [[1, 2], [3, 4]])
    assert table.count("\n") == 3
    with pytest.raises(ValueError, match="Invalid row"):
        markdown_table(["a", "b"], [[1]])


# --------------------------------------------------------------------- protocol
def test_divergence_is_stopped_and_not_tuned():
    task = TASKS["wine_unscaled_mlp"]
    run = train(task, OptimizerConfig("sgd", 10.0), steps=30, seed=0)
    assert run.diverged and run.diverged_at is not None
    assert len(run.losses) == run.diverged_at - 1 < 30
    assert math.isnan(run.held_out["metric"])

    protocol = Protocol(steps=15, seeds=(0,), grids={"sgd": (1e-4, 10.0)})
    runs = execute([task], protocol, progress=False)
    summary = summarise_task(task, runs[task.name], protocol)
    assert summary["best_lr"]["sgd"] == 1e-4
    assert summary["divergences"]["all_runs"] >= 1


def test_a_failing_run_is_recorded_not_fatal():
    def broken_loss(output, target):
        raise RuntimeError("boom")

    task = dataclasses.replace(TASKS["wine_logreg"], loss_fn=broken_loss)
    protocol = Protocol(steps=5, seeds=(0,), grids={"adam": (1e-3, 1e-2)})
    runs = execute([task], protocol, progress=False)[task.name]
    assert len(runs) == 3 and all(r.error == "RuntimeError: boom" for r in runs)
    summary = summarise_task(task, runs, protocol)
    assert len(summary["failures"]) == 3
    assert summary["entries"]["ng"]["failures"] == 1
    assert summary["speedup"]["adam_tuned"] is None


def test_loss_outcome_has_ties():
    entry = lambda loss: {"final_loss_mean": loss}  # noqa: E731
    assert loss_outcome(entry(1.0), entry(1.005)) == "tie"
    assert loss_outcome(entry(0.5), entry(1.0)) == "win"
    assert loss_outcome(entry(2.0), entry(1.0)) == "loss"
    assert loss_outcome(entry(1.0), entry(math.nan)) == "win"


# --------------------------------------------------------------------- commands
def test_compare_main_writes_well_formed_outputs(tmp_path, capsys):
    tasks = ["wine_logreg", "digits_cnn"]
    argv = ["--steps", "20", "--seeds", "1", "--grid-points", "2"]
    argv += ["--tasks", ",".join(tasks), "--out", str(tmp_path), "--no-progress"]
    assert compare.main(argv) == 0
    printed = capsys.readouterr().out
    assert f"saved json: {tmp_path / 'results.json'}" in printed

    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results) == {"benchmark", "config", "tasks", "aggregate"}
    assert results["config"]["steps"] == 20
    assert set(results["config"]["grids"]) == set(BASELINES)
    assert [t["name"] for t in results["tasks"]] == tasks
    for task in results["tasks"]:
        assert set(task["entries"]) == set(ENTRIES)
        for entry in task["entries"].values():
            assert math.isfinite(entry["final_loss_mean"])
            assert math.isfinite(entry["ms_per_step_mean"])
        speedup = task["speedup"]["adam_tuned"]
        assert speedup["value"] > 0 and isinstance(speedup["censored"], bool)
        # NG, its untrained ablation, 3 baselines x 2 grid points, Adam(1e-3)
        # and 3 peers, one seed.
        assert len(task["runs"]) == 12
        curve = task["runs"][0]["curve"]
        assert len(curve["step"]) == len(curve["loss"]) == 20
        assert set(task["outcome"]) == {
            "adam_default",
            "adam_tuned",
            *PEERS,
            "untrained",
        }
    assert set(results["config"]["peers"]) == set(PEERS)
    assert all(p["version"] for p in results["config"]["peers"].values())
    agg = results["aggregate"]
    assert results["config"]["ablation"] is True
    assert agg["num_tasks"] == 2 and agg["runs_total"] == 24
    assert sum(agg["outcome_vs_adam_default"].values()) == 2
    assert list(agg["outcome_vs"]) == [
        "adam_default",
        "adam_tuned",
        *PEERS,
        "untrained",
    ]
    assert all(sum(c.values()) == 2 for c in agg["outcome_vs"].values())
    assert agg["median_speedup_vs_adam_tuned"] > 0

    markdown = (tmp_path / "results.md").read_text()
    for name in tasks:
        assert len(_table_rows(markdown, name)) == 3  # loss, metric, speedup tables
    assert "## Aggregate" in markdown
    header = next(line for line in markdown.splitlines() if line.startswith("| task"))
    assert all(f"| {label} |" in header for label in PEER_LABELS)
    assert "| NG untrained |" in header
    # A final-loss cell per entry in each task row.
    assert _table_rows(markdown, "wine_logreg")[0].count("|") == 12
    beats, by_metric = [x for x in markdown.splitlines() if "NG beats" in x]
    assert "final train loss" in beats and "held-out metric" in by_metric
    for label, key in zip(PEER_LABELS, PEERS):
        count = agg["outcome_vs"][key]["win"]
        assert f"{label} on **{count}/2** tasks" in beats
        count = agg["metric_outcome_vs"][key]["win"]
        assert f"{label} on **{count}/2** (" in by_metric
    # Every entry is drawn in its own colour; the peers dash-dotted.
    assert len({ENTRY_COLORS[k] for k in ENTRIES}) == len(ENTRIES)
    assert all(ENTRY_STYLES[k] == "-." for k in PEERS)
    _check_png(tmp_path / "loss_curves.png")


def test_commands_reject_bad_arguments(tmp_path, capsys):
    out = ["--out", str(tmp_path)]
    assert compare.main(["--tasks", "nope", *out]) == 2
    assert compare.main(["--rule", str(tmp_path / "missing"), *out]) == 2
    assert scaling.main(["--rule", str(tmp_path / "missing"), *out]) == 2
    assert overhead.main(["--families", "rnn", *out]) == 2
    assert "Invalid rule" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_compare_uses_the_rule_given(tmp_path):
    gen = torch.Generator().manual_seed(0)
    rule = UpdateRule(RuleConfig(node_dim=8, edge_dim=4, head_hidden=4))
    with torch.no_grad():
        for p in rule.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    save_rule(rule, tmp_path / "rule")
    protocol = Protocol(steps=15, seeds=(0,))
    results = compare.run_compare(
        get_tasks(["wine_logreg"]),
        protocol,
        rule_path=str(tmp_path / "rule"),
        progress=False,
    )
    entries = results["tasks"][0]["entries"]
    assert set(entries) == {"ng", "adam_default"}
    # A random rule is not Adam: the two runs must differ.
    assert (
        entries["ng"]["final_loss_mean"] != entries["adam_default"]["final_loss_mean"]
    )
    assert results["config"]["rule_path"] == str(tmp_path / "rule")


def test_overhead_main_writes_well_formed_outputs(tmp_path):
    # One family: each memory probe is a fresh interpreter (seconds to start).
    argv = ["--sizes", "3000", "--families", "mlp", "--repeats", "2"]
    assert overhead.main([*argv, "--out", str(tmp_path), "--no-progress"]) == 0
    results = json.loads((tmp_path / "overhead.json").read_text())
    (row,) = results["rows"]
    assert row["family"] == "mlp"
    assert abs(row["num_params"] - 3000) / 3000 < 0.2
    for name in ("ng", "adam"):
        assert row[name]["step_ms"] > 0 and row[name]["train_step_ms"] > 0
        assert row[name]["peak_bytes"] >= 0 and row[name]["state_bytes"] > 0
    assert row["ratio"]["step_ms"] > 0
    markdown = (tmp_path / "overhead.md").read_text()
    assert len(_table_rows(markdown, f"mlp ({row['width']} units)")) == 1
    _check_png(tmp_path / "overhead.png")


def test_overhead_cnn_series_times_both_optimizers():
    (row,) = overhead.measure_overhead(
        ["cnn"], [3000], repeats=2, warmup=1, memory=False, progress=False
    )
    assert overhead.FAMILIES["cnn"](row["width"]) == row["num_params"]
    assert (
        sum(p.numel() for p in overhead.build_model("cnn", row["width"]).parameters())
        == row["num_params"]
    )
    assert row["ratio"]["step_ms"] > 0 and row["ratio"]["train_step_ms"] > 0
    assert row["ratio"]["peak_bytes"] is None  # not measured


def test_scaling_main_writes_well_formed_outputs(tmp_path):
    argv = ["--quick", "--widths", "16,48", "--depths", "3", "--steps", "20"]
    assert scaling.main([*argv, "--out", str(tmp_path), "--no-progress"]) == 0
    results = json.loads((tmp_path / "scaling.json").read_text())
    sweeps = results["sweeps"]
    assert [p["value"] for p in sweeps["width"]] == [16, 48]
    assert [p["value"] for p in sweeps["depth"]] == [3]
    for point in sweeps["width"] + sweeps["depth"]:
        for key in ("adam_default", "adam_tuned"):
            assert point["loss_ratio"][key] > 0
            assert point["speedup"][key]["value"] > 0
        for key in PEERS:
            assert point["loss_ratio"][key] == pytest.approx(
                point["final_loss"]["ng"] / point["final_loss"][key]
            )
        assert math.isfinite(point["final_loss"]["ng"])
    assert set(results["config"]["peers"]) == set(PEERS)
    markdown = (tmp_path / "scaling.md").read_text()
    assert len(_table_rows(markdown, "16")) == len(_table_rows(markdown, "3")) == 1
    assert all(f"| NG / {label} |" in markdown for label in PEER_LABELS)
    assert all(f"vs {label} " in markdown for label in PEER_LABELS)  # trends
    _check_png(tmp_path / "scaling.png")
    assert "shape" not in sweeps  # only with --shapes


def test_scaling_shapes_grow_width_and_depth_together(tmp_path):
    argv = ["--quick", "--widths", "8", "--depths", "1", "--shapes", "8x1,24x3"]
    argv += ["--steps", "12", "--peers", "none", "--out", str(tmp_path)]
    argv += ["--no-progress"]
    assert scaling.main(argv) == 0
    results = json.loads((tmp_path / "scaling.json").read_text())
    assert results["config"]["shapes"] == [[8, 1], [24, 3]]
    shape = results["sweeps"]["shape"]
    assert [p["value"] for p in shape] == ["8x1", "24x3"]
    # mnist1d: 40 inputs, 10 classes.
    assert shape[1]["num_params"] == 40 * 24 + 24 + 2 * (24 * 24 + 24) + 24 * 10 + 10
    assert shape[0]["num_params"] == 40 * 8 + 8 + 8 * 10 + 10
    assert all(p["loss_ratio"]["adam_tuned"] > 0 for p in shape)
    assert all(set(p["loss_ratio"]) == {"adam_default", "adam_tuned"} for p in shape)
    markdown = (tmp_path / "scaling.md").read_text()
    assert "## Width and depth together" in markdown
    assert len(_table_rows(markdown, "24x3")) == 1


@pytest.mark.parametrize("bad", ["1024", "x6", "1024x", "ax6", "1024x6,7"])
def test_scaling_rejects_malformed_shapes(bad, capsys):
    with pytest.raises(SystemExit):
        scaling.main(["--shapes", bad])
    assert "invalid shape" in capsys.readouterr().err


# ------------------------------------------------------------------------ peers
@pytest.mark.parametrize("name", PEERS)
def test_peers_build_and_train(name):
    spec = PEER_SPECS[name]
    model = torch.nn.Linear(3, 2)
    opt = OptimizerConfig(name).build(model.parameters())
    assert type(opt).__name__ == spec.factory
    assert all(opt.defaults[k] == v for k, v in spec.kwargs.items())
    run = train(TASKS["wine_logreg"], OptimizerConfig(name), steps=15, seed=0)
    assert run.completed and len(run.losses) == 15
    assert all(math.isfinite(v) for v in run.losses)
    assert math.isfinite(run.held_out["metric"]) and run.wall_s > 0
    with pytest.raises(ValueError, match="runs at its defaults"):
        OptimizerConfig(name, 1e-3)


def test_peers_argument():
    assert parse_peers("all") == parse_peers(None) == PEERS
    assert parse_peers("none") == ()
    assert parse_peers("ldog, prodigy") == ("prodigy", "ldog")  # table order
    with pytest.raises(ValueError, match="Invalid peer: 'adam'"):
        parse_peers("prodigy,adam")
    with pytest.raises(ValueError, match="Invalid peers"):
        Protocol(steps=1, seeds=(0,), peers=("sgd",))


def _evaluated_weights(monkeypatch) -> list[list[torch.Tensor]]:
    """Record the parameters of every model the held-out evaluation sees."""
    seen: list[list[torch.Tensor]] = []
    real = Task.evaluate

    def evaluate(self, model):
        seen.append([p.detach().clone() for p in model.parameters()])
        return real(self, model)

    monkeypatch.setattr(Task, "evaluate", evaluate)
    return seen


def _equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_schedulefree_is_evaluated_at_its_x_sequence(monkeypatch):
    """Its docs: ``optimizer.train()`` before training steps, ``optimizer.eval()``
    before evaluating (``x``, not the gradient point ``y``). The held-out metric
    and every recorded train loss must be at ``x``."""
    import schedulefree

    task, steps = TASKS["wine_logreg"], 6
    seen = _evaluated_weights(monkeypatch)
    run = train(task, OptimizerConfig("schedulefree"), steps=steps, seed=0)

    model = task.make_model(0)
    opt = schedulefree.AdamWScheduleFree(model.parameters())
    opt.train()
    generator, x_losses = task.batch_generator(0), []
    for _ in range(steps):
        batch = task.sample_batch(generator)
        opt.eval()
        with torch.no_grad():
            x_losses.append(float(task.loss(model, batch)))
        opt.train()
        opt.zero_grad()
        task.loss(model, batch).backward()
        opt.step()
    y = [p.detach().clone() for p in model.parameters()]
    opt.eval()
    x = [p.detach().clone() for p in model.parameters()]

    assert not _equal(x, y)  # so evaluating without eval() would be caught
    assert len(seen) == 1 and _equal(seen[0], x)
    assert run.losses == x_losses


def test_ldog_is_evaluated_at_its_polynomial_average(monkeypatch):
    """Its docs: DoG / LDoG "must be combined with iterate averaging"
    (``PolynomialDecayAverager``, stepped after each optimizer step); the
    averaged model is evaluated and its train loss recorded."""
    import dog

    task, steps = TASKS["wine_logreg"], 6
    seen = _evaluated_weights(monkeypatch)
    run = train(task, OptimizerConfig("ldog"), steps=steps, seed=0)

    model = task.make_model(0)
    opt = dog.LDoG(model.parameters())
    averager = dog.PolynomialDecayAverager(model)
    generator, averaged_losses = task.batch_generator(0), []
    for _ in range(steps):
        batch = task.sample_batch(generator)
        with torch.no_grad():
            averaged_losses.append(float(task.loss(averager.averaged_model, batch)))
        opt.zero_grad()
        task.loss(model, batch).backward()
        opt.step()
        averager.step()
    averaged = [p.detach().clone() for p in averager.averaged_model.parameters()]

    assert not _equal(averaged, list(model.parameters()))
    assert len(seen) == 1 and _equal(seen[0], averaged)
    assert run.losses == averaged_losses


def test_a_missing_peer_package_names_the_bench_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "prodigyopt", None)  # import fails
    with pytest.raises(
        MissingPeerError, match=r"prodigyopt.*pip install -e '\.\[bench"
    ):
        OptimizerConfig("prodigy").build(torch.nn.Linear(2, 1).parameters())
    argv = ["--steps", "5", "--tasks", "wine_logreg", "--peers", "prodigy"]
    assert compare.main([*argv, "--out", str(tmp_path), "--no-progress"]) == 2
    assert "pip install -e '.[bench]'" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # failed before any run
    assert compare.main(["--peers", "nope", "--out", str(tmp_path)]) == 2
    assert "Invalid peer: 'nope'" in capsys.readouterr().err


def test_benchmarks_import_without_the_peer_packages(monkeypatch):
    """No module of the package imports a peer's package at its top level (each
    module's code is run afresh with those imports failing)."""
    import importlib.util
    import pkgutil

    import benchmarks

    for spec in PEER_SPECS.values():
        monkeypatch.setitem(sys.modules, spec.module, None)
    names = [
        m.name
        for m in pkgutil.walk_packages(benchmarks.__path__, "benchmarks.")
        if not m.name.endswith("__main__")  # those run their command
    ]
    assert {
        "benchmarks.optim.optimizers",
        "benchmarks.optim.compare",
        "benchmarks.optim.scaling",
        "benchmarks.optim.summary",
        "benchmarks.weightspace.run",
        "benchmarks.compare",
    } <= set(names)
    for name in names:
        found = importlib.util.find_spec(name)
        module = importlib.util.module_from_spec(found)
        # Registered while it runs, as an import would (dataclasses look their
        # module up); monkeypatch puts back whatever was there.
        monkeypatch.setitem(sys.modules, found.name, module)
        found.loader.exec_module(module)


# ------------------------------------------------------------------------ cache
def test_run_cache_reuses_baselines_and_peers(tmp_path, monkeypatch):
    from benchmarks.optim import cache as cache_module
    from benchmarks.optim import protocol as protocol_module
    from benchmarks.optim.cache import RunCache

    task = TASKS["wine_logreg"]
    protocol = Protocol(steps=12, seeds=(0,), grids={"adam": (1e-2, 1e-1)}, peers=PEERS)
    cache = RunCache(tmp_path / "cache")
    first = execute([task], protocol, progress=False, cache=cache)[task.name]
    assert cache.hits == 0 and len(list((tmp_path / "cache").glob("*.json"))) == 6

    trained = []
    real_train = protocol_module.train
    monkeypatch.setattr(
        protocol_module,
        "train",
        lambda task, config, *a, **k: (
            trained.append(config.name) or real_train(task, config, *a, **k)
        ),
    )
    second = execute([task], protocol, progress=False, cache=cache)[task.name]
    assert trained == ["ng"]  # only the learned optimizer ran again
    assert cache.hits == 6
    for a, b in zip(first, second):
        assert a.optimizer == b.optimizer and a.losses == b.losses
        assert a.held_out == b.held_out
    summaries = [summarise_task(task, runs, protocol) for runs in (first, second)]
    for key in ("best_lr", "speedup", "outcome", "tuning"):
        assert summaries[0][key] == summaries[1][key], key
    assert summaries[0]["entries"]["prodigy"] == summaries[1]["entries"]["prodigy"]

    # Another step budget is another key; so is another release of a peer's
    # package (the baselines' keys do not change with it).
    assert cache.get(task.name, OptimizerConfig("adam", 1e-2), 0, 13, 10.0) is None
    monkeypatch.setattr(cache_module, "peer_version", lambda name: "99.0")
    assert cache.get(task.name, OptimizerConfig("prodigy"), 0, 12, 10.0) is None
    assert cache.get(task.name, OptimizerConfig("adam", 1e-2), 0, 12, 10.0)
    # A corrupted file is a miss, not a crash.
    for path in (tmp_path / "cache").glob("*.json"):
        path.write_text("{not json")
    assert cache.get(task.name, OptimizerConfig("adam", 1e-2), 0, 12, 10.0) is None


def test_run_cache_rejects_a_file_path(tmp_path):
    from benchmarks.optim.cache import RunCache

    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        RunCache(tmp_path / "file")


def test_compare_with_no_tuned_baselines_runs_the_peers(tmp_path):
    argv = ["--steps", "10", "--seeds", "1", "--grid-points", "0", "--tasks"]
    argv += ["wine_logreg", "--no-progress"]
    assert compare.main([*argv, "--out", str(tmp_path / "all")]) == 0
    results = json.loads((tmp_path / "all" / "results.json").read_text())
    assert set(results["tasks"][0]["entries"]) == {
        "ng",
        "untrained",
        "adam_default",
        *PEERS,
    }
    assert results["config"]["grids"] == {}
    markdown = (tmp_path / "all" / "results.md").read_text()
    header = next(line for line in markdown.splitlines() if line.startswith("| task"))
    assert "Adam*" not in header and "| LDoG |" in header

    argv += ["--peers", "none", "--no-ablation"]
    assert compare.main([*argv, "--out", str(tmp_path / "no")]) == 0
    results = json.loads((tmp_path / "no" / "results.json").read_text())
    assert set(results["tasks"][0]["entries"]) == {"ng", "adam_default"}
    assert results["config"]["ablation"] is False
    assert results["config"]["peers"] == {}
    assert "Prodigy" not in (tmp_path / "no" / "results.md").read_text()


def test_summary_table_one_row_per_rule(tmp_path, capsys):
    from benchmarks.optim import summary

    argv = ["--steps", "10", "--seeds", "1", "--grid-points", "2", "--tasks"]
    argv += ["wine_logreg,breast_cancer_logreg", "--no-progress"]
    assert compare.main([*argv, "--out", str(tmp_path / "a")]) == 0
    argv_b = [*argv, "--steps", "12", "--peers", "none", "--out", str(tmp_path / "b")]
    assert compare.main(argv_b) == 0
    out = tmp_path / "table.md"
    items = [f"first={tmp_path / 'a' / 'results.json'}"]
    items += [f"second={tmp_path / 'b' / 'results.json'}"]
    assert summary.main([*items, "--out", str(out)]) == 0
    lines = out.read_text().splitlines()
    assert "median speedup vs tuned Adam" in lines[0] and "wine_logreg" in lines[0]
    assert all(f"| beats {label} |" in lines[0] for label in PEER_LABELS)
    assert lines[2].startswith("| first |") and "/2 |" in lines[2]
    assert lines[3].startswith("| second (other protocol) |")
    assert lines[3].split(" | ")[4:7] == ["-", "-", "-"]  # it ran no peers
    assert summary.main([f"bad={tmp_path / 'table.md'}"]) == 2
    assert "not JSON" in capsys.readouterr().err


def test_import_time_main_writes_the_ratio(tmp_path, monkeypatch, capsys):
    """Cheap stand-in statements keep this fast; the arithmetic and files are
    what is checked (the real figures come from the command)."""
    monkeypatch.setattr(
        import_time, "STATEMENTS", {"torch": "pass", "lopt": "import json"}
    )
    record = import_time.main(["--repeats", "2", "--out", str(tmp_path)])
    times = record["times"]
    assert set(times) == {"torch", "lopt"}
    assert all(
        t["repeats"] == 2 and t["min_s"] <= t["median_s"] for t in times.values()
    )
    assert record["ratio"] == pytest.approx(
        times["lopt"]["median_s"] / times["torch"]["median_s"]
    )
    saved = json.loads((tmp_path / "import_time.json").read_text())
    assert saved["ratio"] == record["ratio"]
    markdown = (tmp_path / "import_time.md").read_text()
    assert f"**{record['ratio']:.2f}x**" in markdown
    assert "import_time.md" in capsys.readouterr().out


def test_import_time_rejects_bad_repeats():
    with pytest.raises(ValueError, match="^Invalid repeats: 0$"):
        import_time.time_imports(0)


def _metric_summary(ng, other, higher):
    return {
        "metric": {"name": "m", "higher_is_better": higher},
        "entries": {"ng": {"metric_mean": ng}, "adam_tuned": {"metric_mean": other}},
    }


@pytest.mark.parametrize(
    ("ng", "other", "higher", "want"),
    [
        (0.99, 0.98, True, "win"),
        (0.98, 0.99, True, "loss"),
        (0.5, 0.6, False, "win"),
        (1.0, 1.0, True, "tie"),
        (1.0, 0.9995, True, "tie"),  # within 0.1%
        (math.nan, 0.9, True, "loss"),
        (0.9, math.nan, True, "win"),
    ],
)
def test_metric_outcome_ranks_by_the_tasks_direction(ng, other, higher, want):
    summary = _metric_summary(ng, other, higher)
    assert compare.metric_outcome(summary, "adam_tuned") == want
    assert compare.metric_outcome(summary, "prodigy") is None  # not run
    counts = compare._count_metric_outcomes([summary, summary], "adam_tuned")
    assert counts[want] == 2 and sum(counts.values()) == 2
