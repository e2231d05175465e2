"""The workloads benchmark's machinery: recipes, runs, the cache, rankings."""

from __future__ import annotations

import functools
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.optim.workloads import WORKLOAD_NAMES, get_workloads
from benchmarks.optim.workloads.recipes import (
    RECIPES,
    Recipe,
    Trainer,
    lr_grid,
    warmup_cosine,
)
from benchmarks.optim.workloads.report import counts, markdown, summarise
from benchmarks.optim.workloads.runner import RunCache, RunRecord, train_run
from benchmarks.optim.workloads.spec import Job, Workload, hidden_matrices, split_decay


def _make(seed: int, quick: bool, scale: float = 1.0) -> Job:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1)
    )
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(4, 1, generator=torch.Generator().manual_seed(99))
    x_val = torch.randn(64, 4, generator=torch.Generator().manual_seed(98))

    def next_batch():
        x = torch.randn(32, 4, generator=gen)
        return x, torch.sin(x @ w)

    def loss(m, batch):
        return scale * F.mse_loss(m(batch[0]), batch[1])

    def evaluate(m):
        value = float(F.mse_loss(m(x_val), torch.sin(x_val @ w)))
        return {"val_loss": value, "score": -value}

    decay, no_decay = split_decay(model)
    matrices = hidden_matrices(model, exclude=[model[0], model[-1]])
    return Job(model, next_batch, loss, evaluate, decay, no_decay, matrices)


TOY = Workload(
    "toy",
    "tiny regression",
    "val_loss",
    False,
    40,
    12,
    10,
    1e-2,
    _make,
    clip=1.0,
    quick_eval_every=4,
)


def test_groups_and_matrices_of_the_toy_job():
    job = _make(0, True)
    assert len(job.decay) == 3 and len(job.no_decay) == 3
    assert [p.shape for p in job.matrices] == [torch.Size([16, 16])]


def test_recipes_validate_their_learning_rate():
    with pytest.raises(ValueError, match="Invalid recipe: 'sgd'"):
        Recipe("sgd")
    with pytest.raises(ValueError, match="Invalid learning rate for adamw"):
        Recipe("adamw")
    with pytest.raises(ValueError, match="Invalid learning rate for ng"):
        Recipe("ng", 1e-3)
    assert lr_grid("ng", False) == (None,)
    assert len(lr_grid("adamw", False)) > len(lr_grid("adamw", True)) >= 1


def test_warmup_then_cosine_to_zero():
    factor = warmup_cosine(100)
    values = [factor(t) for t in range(100)]
    assert values[0] < values[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(values[4:], values[5:]))
    assert values[-1] < 0.01


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_trains_the_toy_job(name):
    recipe = Recipe(name, lr_grid(name, True)[0])
    record = train_run(TOY, recipe, seed=0, quick=True)
    assert record.diverged_at is None
    assert record.eval_steps == [4, 8, 12]
    assert len(record.train_losses) == 12
    assert record.eval_seconds == sorted(record.eval_seconds) and record.seconds > 0
    assert all(math.isfinite(e["val_loss"]) for e in record.evals)
    assert record.evals[-1]["val_loss"] < record.evals[0]["val_loss"] * 1.5


def test_muon_takes_the_matrices_and_adamw_the_rest():
    job = _make(0, True)
    trainer = Trainer(Recipe("muon", 0.02), job, TOY, 10)
    muon, adamw = trainer.optimizers
    assert isinstance(muon, torch.optim.Muon)
    muon_params = {id(p) for g in muon.param_groups for p in g["params"]}
    adamw_params = {id(p) for g in adamw.param_groups for p in g["params"]}
    assert muon_params == {id(p) for p in job.matrices}
    assert not muon_params & adamw_params
    assert muon_params | adamw_params == {id(p) for p in job.model.parameters()}


def test_a_diverging_run_stops_and_reads_as_worst():
    exploding = Workload(
        "boom",
        "",
        "val_loss",
        False,
        40,
        30,
        10,
        0.0,
        lambda s, q: _make(s, q, scale=1e3),
    )
    record = train_run(exploding, Recipe("adamw", 1e3), seed=0, quick=True)
    assert record.diverged_at is not None
    assert math.isnan(record.final("val_loss"))


def test_cache_round_trip_and_keys(tmp_path):
    cache = RunCache(tmp_path / "cache")
    recipe = Recipe("adamw", 1e-3)
    record = train_run(TOY, recipe, 0, True)
    assert cache.get(TOY, recipe, 0, True) is None
    cache.put(TOY, recipe, 0, True, record)
    assert cache.get(TOY, recipe, 0, True) == record
    assert cache.get(TOY, Recipe("adamw", 3e-3), 0, True) is None
    assert cache.get(TOY, recipe, 1, True) is None
    assert cache.get(TOY, recipe, 0, False) is None
    (path,) = (tmp_path / "cache").glob("*.json")
    path.write_text("{not json")
    assert cache.get(TOY, recipe, 0, True) is None  # unreadable: run again
    assert cache.hits == 1


def test_ng_runs_are_keyed_by_the_rule(tmp_path, monkeypatch):
    from benchmarks.optim.workloads import runner

    cache = RunCache(tmp_path)
    key = cache.key(TOY, Recipe("ng"), 0, True)
    monkeypatch.setattr(runner, "_rule_checksum", lambda: "another rule")
    assert cache.key(TOY, Recipe("ng"), 0, True) != key
    assert "rule" not in cache.key(TOY, Recipe("adamw", 1e-3), 0, True)


def test_ng_runs_are_keyed_by_their_graph_source(tmp_path):
    """``--ng-graph``: NG runs with another graph source are cached apart;
    the default keeps the keys of runs cached before the option existed, and
    the baselines' keys never change."""
    default, traced = RunCache(tmp_path), RunCache(tmp_path, "traced")
    ng, adamw = Recipe("ng"), Recipe("adamw", 1e-3)
    assert "structure" not in default.key(TOY, ng, 0, True)
    assert traced.key(TOY, ng, 0, True) != default.key(TOY, ng, 0, True)
    assert traced.key(TOY, adamw, 0, True) == default.key(TOY, adamw, 0, True)


@pytest.mark.parametrize("structure", ["model", "named", "traced"])
def test_ng_trains_the_toy_job_with_each_graph_source(structure):
    """The toy MLP traces, so ``traced`` uses the fx graph (no fallback
    warning); every source trains it."""
    import warnings

    make = functools.partial(Trainer, structure=structure)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        record = train_run(TOY, Recipe("ng"), 0, True, make)
    assert record.diverged_at is None
    assert record.evals[-1]["val_loss"] < record.evals[0]["val_loss"]


def _record(recipe, lr, finals, seconds=1.0):
    steps = [10 * (i + 1) for i in range(len(finals))]
    return RunRecord(
        "toy",
        recipe,
        lr,
        0,
        True,
        steps[-1],
        train_losses=[1.0],
        eval_steps=steps,
        eval_seconds=[seconds * (i + 1) / len(finals) for i in range(len(finals))],
        evals=[{"val_loss": v} for v in finals],
        seconds=seconds,
    )


def test_rankings_pick_the_best_lr_and_read_ng_at_adamws_seconds():
    records = [
        _record("adamw", 1e-3, [0.5, 0.3], seconds=1.0),
        _record("adamw", 1e-2, [0.4, 0.2], seconds=1.0),
        _record("prodigy", None, [0.6, 0.25], seconds=1.0),
        _record("ng", None, [0.3, 0.22, 0.19, 0.1], seconds=2.0),
        _record("ng_untrained", None, [0.3, 0.25], seconds=2.0),
    ]
    summary = summarise(records, [TOY])["toy"]
    assert summary["recipes"]["adamw"]["lr"] == 1e-2
    assert summary["recipes"]["adamw"]["final"] == 0.2
    assert summary["target"] == 0.2  # the best baseline's final
    assert summary["steps_to_target"] == 30  # NG's first eval at or below 0.2
    assert summary["equal_time"] == 0.22  # NG's last eval within AdamW's 1.0 s
    lines = counts(summarise(records, [TOY]))
    assert "NG final metric better than AdamW+cos* on 1/1" in lines
    assert "NG at AdamW+cos*'s wall-clock no worse than AdamW+cos* on 0/1" in lines
    assert "NG divergences: 0/1 runs" in lines
    assert "| toy | val_loss ↓ |" in markdown(summarise(records, [TOY]), "# t")


def test_unknown_workload_is_named():
    with pytest.raises(ValueError, match="Invalid workload: nope"):
        get_workloads(["nope"])


@pytest.mark.parametrize("name", WORKLOAD_NAMES)
def test_registered_workloads_carry_their_names(name):
    (workload,) = get_workloads([name])
    assert workload.name == name
    assert workload.quick_steps < workload.steps


def test_command_writes_its_outputs_and_reuses_the_cache(tmp_path, capsys):
    from benchmarks.optim.workloads import bench

    argv = [
        "--quick",
        "--workloads",
        "tabular",
        "--recipes",
        "ng,adamw",
        "--cache",
        str(tmp_path / "c"),
        "--out",
        str(tmp_path / "o"),
        "--no-progress",
    ]
    assert bench.main(argv) == 0
    data = json.loads((tmp_path / "o" / "workloads.json").read_text())
    assert {r["recipe"] for r in data["runs"]} == {"ng", "adamw"}
    assert (tmp_path / "o" / "workloads.png").stat().st_size > 0
    assert bench.main(argv) == 0
    assert "3 runs from the cache" in capsys.readouterr().out


def test_trace_reports_the_controller_and_honours_the_floor(capsys):
    from benchmarks.optim.workloads import trace

    argv = ["--workload", "tabular", "--recipe", "ng", "--steps", "6", "--every", "3"]
    assert trace.main([*argv, "--log-min", "0"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["step"] for r in rows] == [1, 3, 6]
    assert all(r["log_step"][0] >= 0.0 for r in rows)  # the floor holds
    assert all(len(r["rel_update"]) == 3 and r["rel_update"][1] > 0 for r in rows)
    argv = ["--workload", "tabular", "--recipe", "adamw", "--lr", "1e-3"]
    assert trace.main([*argv, "--steps", "2", "--log-min", "0"]) == 2
    assert "--log-min applies to the NG recipes" in capsys.readouterr().err


def test_muon_is_skipped_where_it_does_not_apply(tmp_path):
    from benchmarks.optim.workloads.bench import run_all
    from benchmarks.optim.workloads.recipes import NotApplicable

    def no_matrices(seed, quick):
        job = _make(seed, quick)
        job.matrices = []
        return job

    flat = Workload("flat", "", "val_loss", False, 40, 6, 3, 0.0, no_matrices)
    with pytest.raises(NotApplicable, match="no hidden 2-D matrices"):
        Trainer(Recipe("muon", 0.02), no_matrices(0, True), flat, 6)
    records = run_all([flat], ["ng", "muon"], 1, True, RunCache(tmp_path), False)
    assert [r.recipe for r in records] == ["ng"]
    assert "better than Muon+AdamW* on 0/0 (1 without it)" in "\n".join(
        counts(summarise(records, [flat]))
    )
