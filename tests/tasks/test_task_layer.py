"""The task layer shared by the benchmarks and meta-training: one data set class
and registry, one task interface, one inner training loop."""

from __future__ import annotations

import copy
import hashlib
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import random_rule

import lopt.tasks.families
import lopt.tasks.suite
import meta_train
from benchmarks.optim.optimizers import OptimizerConfig
from benchmarks.optim.training import train
from lopt import NGOptimizer, RuleConfig
from lopt.graph import NeuralGraph
from lopt.optim.functional import init_state, ng_step
from lopt.tasks import data
from lopt.tasks.data import Dataset
from lopt.tasks.families import TaskConfig, input_scales, make_task
from lopt.tasks.families import load_family_dataset as load_dataset
from lopt.tasks.loop import ModuleLearner, RuleLearner, run
from lopt.tasks.suite import TASKS
from lopt.tasks.task import Task
from meta_train.evaluate import loss_curve, rule_trajectory

# ------------------------------------------------------------------------ data
#: SHA-256 of the bytes of x_train, y_train, x_test, y_test (in that order) of
#: meta-training's data sets, recorded before the task layer was unified, from
#: the old ``meta_train.data.load_dataset(name)`` (its ``x, y, x_val, y_val``).
#: Every validation figure recorded so far was computed on exactly these
#: tensors: a change here makes them incomparable. (The data depend on
#: ``mnist1d`` 0.0.2.post1 and scikit-learn's shipped digits.)
META_DATA_SHA256 = {
    "mnist1d": "e82e98e91c46425deb3a97ee3ef2c954bf5f237d1ad3f7cd5898c4d6ff5eb373",
    "digits": "7bbd1e0968a21d45f43e7079672ed1f3660e67db312b5a9294961688d492340f",
}


def _sha256(dataset: Dataset) -> str:
    digest = hashlib.sha256()
    for t in (dataset.x_train, dataset.y_train, dataset.x_test, dataset.y_test):
        digest.update(t.contiguous().numpy().tobytes())
    return digest.hexdigest()


@pytest.mark.parametrize("name", sorted(META_DATA_SHA256))
def test_meta_training_data_are_the_recorded_tensors(name):
    dataset = load_dataset(name)
    assert isinstance(dataset, Dataset)
    assert dataset.x_train.dtype == torch.float32
    assert dataset.y_train.dtype == torch.int64
    assert dataset.num_classes == 10
    assert _sha256(dataset) == META_DATA_SHA256[name]


def test_one_registry_keeps_both_variants_apart():
    # meta-training's variants are entries of the one registry, not the suite's
    assert load_dataset("mnist1d") is data.load_dataset("meta_mnist1d")
    assert load_dataset("digits") is data.load_dataset("meta_digits")
    assert len(data.mnist1d().x_train) == 4000
    assert len(data.meta_mnist1d().x_train) == 3200
    assert data.digits().x_train.max() <= 1.0 < data.meta_digits().x_train.max()
    with pytest.raises(ValueError, match="Invalid dataset: 'cifar'.*meta_digits"):
        data.load_dataset("cifar")
    with pytest.raises(ValueError, match="Invalid dataset: 'meta_digits'"):
        load_dataset("meta_digits")  # a config names the family's data only


# ----------------------------------------------------------------------- tasks
def _suite_tasks() -> list[Task]:
    return [
        TASKS[n]
        for n in (
            "wine_logreg",
            "digits_autoencoder",
            "mnist1d_gru",
            "reverse_transformer",
        )
    ]


#: Family tasks of every kind, with re-parametrisation and unscaled inputs.
FAMILY_CONFIGS = [
    TaskConfig(
        "digits", (16, 8), "tanh", 1.5, 32, seed=7,
        reparam=(0.2, 3.0, 1.0, 0.5, 8.0, 0.1),
    ),
    TaskConfig(
        "mnist1d", (8,), "relu", 0.7, 16, seed=11, kind="conv1d", input_spread=2.0
    ),
    TaskConfig("mnist1d", (12,), "gelu", 1.0, 16, seed=3, kind="gru"),
    TaskConfig("digits", (), "silu", 1.0, 64, seed=5, kind="mlp", input_spread=1.0),
]  # fmt: skip


def _family_tasks() -> list[tuple[Task, int]]:
    return [(make_task(c), c.seed) for c in FAMILY_CONFIGS]


def _all_tasks() -> list[tuple[Task, int]]:
    return [(t, 4) for t in _suite_tasks()] + _family_tasks()


def test_suite_and_family_tasks_are_one_class():
    assert meta_train.Task is lopt.tasks.families.Task is Task is lopt.tasks.suite.Task
    for task, _ in _all_tasks():
        assert type(task) is Task
        assert isinstance(task.data, Dataset)


@pytest.mark.parametrize("index", range(8))
def test_a_task_satisfies_the_interface(index):
    task, seed = _all_tasks()[index]
    a, b = task.make_model(seed), task.make_model(seed)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    other = task.make_model(seed + 1)
    assert not all(
        torch.equal(p, q) for p, q in zip(a.parameters(), other.parameters())
    )
    state = torch.get_rng_state()
    task.make_model(seed)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone

    batch = task.sample_batch(task.batch_generator(seed))
    again = task.sample_batch(task.batch_generator(seed))
    assert all(torch.equal(u, v) for u, v in zip(batch, again))
    assert len(batch[0]) == task.batch_size
    loss = task.loss(a, batch)
    assert loss.ndim == 0 and torch.isfinite(loss)
    held_out = task.evaluate(a)
    assert set(held_out) == {"metric", "loss"}
    assert all(math.isfinite(v) for v in held_out.values())


@pytest.mark.parametrize("index", range(8))
def test_functional_loss_equals_the_module_loss(index):
    """At other weights than the model's own: the functional loss and its
    gradient are those of a model holding them, bit for bit."""
    task, seed = _all_tasks()[index]
    model = task.make_model(seed)
    batch = task.sample_batch(task.batch_generator(seed))
    gen = torch.Generator().manual_seed(index)
    params = [
        (p.detach() * (1 + 0.1 * torch.randn(p.shape, generator=gen))).requires_grad_()
        for p in model.parameters()
    ]
    functional = task.functional_loss(model, params, batch)
    grads = torch.autograd.grad(functional, params)

    holder = copy.deepcopy(model)
    with torch.no_grad():
        for p, q in zip(holder.parameters(), params):
            p.copy_(q)
    module = task.loss(holder, batch)
    module.backward()
    assert torch.equal(functional, module)
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, holder.parameters()))
    # the model's own weights were not read
    assert not torch.equal(functional, task.loss(model, batch))


def test_functional_loss_names_a_wrong_parameter_count():
    task = TASKS["wine_logreg"]
    model = task.make_model(0)
    batch = task.sample_batch(task.batch_generator(0))
    with pytest.raises(
        ValueError, match="Invalid params: 1 tensors for a model with 2"
    ):
        task.functional_loss(model, [model.weight], batch)


def test_make_task_rejects_configs_the_family_does_not_have():
    base = FAMILY_CONFIGS[0]
    for change, message in [
        ({"kind": "rnn"}, "Invalid task kind: 'rnn'"),
        ({"activation": "elu"}, "Invalid activation: 'elu'"),
        ({"dataset": "wine"}, "Invalid dataset: 'wine'"),
        ({"kind": "lstm", "reparam": ()}, "Invalid hidden for a lstm task"),
    ]:
        with pytest.raises(ValueError, match=message):
            make_task(replace(base, **change))
    task = make_task(replace(base, reparam=(1.0, 2.0)))  # 6 tensors
    with pytest.raises(ValueError, match="Invalid reparam: 2 factors .* 6 parameter"):
        task.make_model(base.seed)


# ------------------------------------------------------------------------ loop
# The loops the shared one replaced, written out as they were (reference
# implementations: the shared loop must give exactly their numbers).
def _old_benchmark_losses(task, optimizer, steps, seed):
    model = task.make_model(seed)
    opt = optimizer.build(model.parameters())
    generator = task.batch_generator(seed)
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = task.loss(model, task.sample_batch(generator))
        losses.append(float(loss.detach()))
        loss.backward()
        opt.step()
    return losses, task.evaluate(model)


def _old_family_start(config):
    """The old meta-training Task's initial parameters and functional loss."""
    torch.manual_seed(config.seed)
    data = load_dataset(config.dataset)
    module = lopt.tasks.families._build_module(
        config, data.num_features, data.num_classes
    )
    names = [n for n, _ in module.named_parameters()]
    scale = torch.tensor(config.reparam) if config.reparam else None
    init = [
        p.detach() * config.init_scale / (1.0 if scale is None else scale[i])
        for i, p in enumerate(module.parameters())
    ]
    factors = input_scales(config, data.num_features)

    def loss(params, x, y):
        if scale is not None:
            params = [p * c for p, c in zip(params, scale.tolist())]
        x = x if factors is None else x * factors
        out = torch.func.functional_call(module, dict(zip(names, params)), (x,))
        return torch.nn.functional.cross_entropy(out, y)

    def batch(gen):
        idx = torch.randint(len(data.x_train), (config.batch_size,), generator=gen)
        return data.x_train[idx], data.y_train[idx]

    return init, loss, batch


def _old_adam_losses(config, steps):
    init, loss_fn, batch = _old_family_start(config)
    gen = torch.Generator().manual_seed(config.seed)
    params = [p.clone().requires_grad_(True) for p in init]
    adam = torch.optim.Adam(params, lr=1e-3)
    losses = []
    for _ in range(steps):
        loss = loss_fn(params, *batch(gen))
        grads = torch.autograd.grad(loss, params)
        losses.append(float(loss.detach()))
        for p, g in zip(params, grads):
            p.grad = g
        adam.step()
    return losses


def _old_rule_losses(rule, config, steps):
    init, loss_fn, batch = _old_family_start(config)
    gen = torch.Generator().manual_seed(config.seed)
    graph = NeuralGraph.from_shapes([p.shape for p in init])
    flat, state = graph.flatten(init), init_state(graph)
    losses = []
    for _ in range(steps):
        current = [p.requires_grad_(True) for p in graph.unflatten(flat.clone())]
        loss = loss_fn(current, *batch(gen))
        grads = graph.flatten(torch.autograd.grad(loss, current))
        losses.append(float(loss.detach()))
        with torch.no_grad():
            flat, state = ng_step(rule, graph, flat, grads, state)
    return losses, flat


@pytest.mark.parametrize("name", ["wine_logreg", "mnist1d_gru"])
def test_the_loop_gives_the_old_benchmark_runs(name):
    task, optimizer = TASKS[name], OptimizerConfig("adam", 1e-2)
    losses, held_out = _old_benchmark_losses(task, optimizer, 12, seed=1)
    run = train(task, optimizer, 12, seed=1)
    assert run.losses == losses and run.held_out == held_out
    assert not run.diverged


@pytest.mark.parametrize("index", range(len(FAMILY_CONFIGS)))
def test_the_loop_gives_the_old_validation_curves(index):
    config = FAMILY_CONFIGS[index]
    assert loss_curve(None, config, 15) == (_old_adam_losses(config, 15), False)
    rule = random_rule(index, config=RuleConfig(step_scale=1e-2))
    losses, flat = _old_rule_losses(rule, config, 15)
    assert loss_curve(rule, config, 15) == (losses, False)
    states = list(rule_trajectory(rule, config, 15))
    assert [s.loss for s in states] == losses
    # the trajectory's states are the old loop's (its last step included)
    final, _ = ng_step(
        rule, states[-1].graph, states[-1].params, states[-1].grads, states[-1].state
    )
    assert torch.equal(final, flat)


def test_the_loop_stops_diverging_runs_as_each_caller_did():
    config = FAMILY_CONFIGS[0]
    # a loss above the limit ends a validation curve (recorded) ...
    wild = random_rule(0, config=RuleConfig(step_scale=3.0))
    losses, diverged = loss_curve(wild, config, 30, stop_above=2.0)
    assert diverged and losses[-1] > 2.0 * losses[0]
    assert all(v <= 2.0 * losses[0] for v in losses[:-1])
    # ... a non-finite one ends it with inf ...
    huge = random_rule(0, config=RuleConfig(step_scale=1e37))
    losses, diverged = loss_curve(huge, config, 30)
    assert diverged and losses[-1] == math.inf and len(losses) < 30
    # ... and a benchmark run leaves the diverging loss out
    task = make_task(config)
    model = task.make_model(config.seed)
    curve = run(
        task, RuleLearner(model, huge), 30, task.batch_generator(config.seed),
        divergence_factor=10.0,
    )  # fmt: skip
    assert curve.diverged and len(curve.losses) == curve.diverged_at - 1
    assert curve.losses == losses[:-1]
    assert not math.isfinite(curve.stop_loss)


@pytest.mark.parametrize("orthogonal", [False, True])
def test_either_learner_trains_either_kind_of_task(orthogonal):
    """The rule's reference step and NGOptimizer (without the fused kernel)
    on the same task: the same run up to float32 rounding, with and without
    orthogonalised hidden matrices."""
    rule = random_rule(1, config=RuleConfig(step_scale=1e-2))
    for task, seed in [(TASKS["wine_logreg"], 2), (make_task(FAMILY_CONFIGS[0]), 7)]:
        functional = run(
            task,
            RuleLearner(task.make_model(seed), rule, orthogonal=orthogonal),
            10,
            task.batch_generator(seed),
        )
        model = task.make_model(seed)
        opt = NGOptimizer(
            model.parameters(), rule=rule, fused=False, orthogonal=orthogonal
        )
        module = run(task, ModuleLearner(model, opt), 10, task.batch_generator(seed))
        assert functional.losses[0] == module.losses[0]
        np.testing.assert_allclose(functional.losses, module.losses, rtol=1e-5)
        assert len(set(module.losses)) == 10  # it trains
