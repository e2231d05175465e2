"""The per-tensor step-size controller of rules whose ``step_size.rate > 0``
(:func:`lopt.optim.step_size.adapt_step_sizes`): its maths, its behaviour on
problems where the right answer is known, and the optimizer contract with it
(fused and reference paths, state dicts, rule files, ``higher``)."""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import paired_step
from torch import nn

from lopt import NGOptimizer, default_rule_path, load_rule, save_rule
from lopt.graph import NeuralGraph
from lopt.optim.features import init_feature_state
from lopt.optim.functional import ng_step
from lopt.optim.fused import cpu_kernel
from lopt.optim.rule import RuleConfig, UpdateRule
from lopt.optim.step_size import LEGACY_FIELDS, StepSizeConfig

RATE = 0.5  # large, so that a few steps move the log steps far

needs_kernel = pytest.mark.skipif(
    not cpu_kernel.available(), reason="no C compiler: the fused kernel is unavailable"
)


def _rule(rate: float = RATE, **kwargs) -> UpdateRule:
    torch.manual_seed(3)
    rule = UpdateRule(
        RuleConfig(degree_features=True), StepSizeConfig(rate=rate, **kwargs)
    )
    with torch.no_grad():  # a rule whose learned part is not zero
        for p in rule.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return rule


def _without_adaptation(rule: UpdateRule) -> UpdateRule:
    plain = copy.deepcopy(rule)
    plain.step_size = dataclasses.replace(rule.step_size, rate=0.0)
    return plain


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def _train(model, opt, steps: int, scale: float = 1.0, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(32, 6, generator=gen)
        y = torch.randint(0, 3, (32,), generator=gen)
        opt.zero_grad()
        (scale * nn.functional.cross_entropy(model(x), y)).backward()
        opt.step()


def _log_steps(opt: NGOptimizer, model: nn.Module) -> torch.Tensor:
    return torch.stack([opt.state[p]["log_step"] for p in model.parameters()])


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("rate", -0.1, r"step_size\.rate"),
        ("rate", float("nan"), r"step_size\.rate"),
        ("decay", 1.0, r"step_size\.decay"),
        ("decay", 0.0, r"step_size\.decay"),
        ("log_min", 0.5, r"step_size\.log_min"),
        ("log_max", -1.0, r"step_size\.log_max"),
        ("log_max", True, r"step_size\.log_max"),
        ("norm", 1.0, r"step_size\.norm"),
        ("norm", -0.1, r"step_size\.norm"),
        ("spike", 0.5, r"step_size\.spike"),
        ("spike_cut", -1.0, r"step_size\.spike_cut"),
    ],
)
def test_invalid_adaptation_settings_are_named(field, value, message):
    with pytest.raises(ValueError, match=message):
        StepSizeConfig(**{field: value})


def test_first_step_is_the_rules_own_step():
    rule = _rule()
    a, b = _mlp(), _mlp()
    opt_a = NGOptimizer(a.parameters(), rule=rule, fused=False)
    opt_b = NGOptimizer(b.parameters(), rule=_without_adaptation(rule), fused=False)
    _train(a, opt_a, 1)
    _train(b, opt_b, 1)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    assert not _log_steps(opt_a, a).any()
    _train(a, opt_a, 1, seed=2)
    _train(b, opt_b, 1, seed=2)
    assert _log_steps(opt_a, a).abs().min() > 0
    assert any(not torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_log_steps_move_by_the_rate_times_the_cosine_with_the_path():
    """ng_step's per-tensor log steps against a direct per-tensor cosine."""
    rule = _rule()
    shapes = [torch.Size([5, 4]), torch.Size([5]), torch.Size([3, 5])]
    graph = NeuralGraph.from_shapes(shapes)
    gen = torch.Generator().manual_seed(0)
    P = graph.num_scalars
    params, grads, trace = (torch.randn(P, generator=gen) for _ in range(3))
    log_step = torch.tensor([0.3, -0.2, 0.1])
    state = init_feature_state(P)._replace(trace=trace, log_step=log_step)
    with torch.no_grad():
        new_params, new_state = ng_step(rule, graph, params, grads, state)
    g, p, t = (graph.unflatten(v) for v in (grads, params, trace))
    order = graph.tensor_order
    for pos, i in enumerate(order):
        cos = nn.functional.cosine_similarity(
            -g[i].reshape(-1), (p[i] - t[i]).reshape(-1), dim=0
        )
        expected = log_step[pos] + RATE * cos
        torch.testing.assert_close(new_state.log_step[pos], expected)
    torch.testing.assert_close(new_state.trace, torch.lerp(trace, params, 0.01))
    # The update is the plain rule's, scaled per tensor by exp(log step).
    with torch.no_grad():
        plain, _ = ng_step(_without_adaptation(rule), graph, params, grads, state)
    ratio = graph.unflatten((new_params - params) / (plain - params))
    for pos, i in enumerate(order):
        # steps of about 1e-3 read off weights of about 1: float32 rounding
        # of the differences is about 1e-4 of the step
        torch.testing.assert_close(
            ratio[i],
            torch.exp(new_state.log_step[pos]).expand_as(ratio[i]),
            rtol=1e-3,
            atol=0,
        )


def test_normalised_log_steps_move_by_the_mean_over_rms_of_the_cosines():
    """With ``step_size.norm`` the log step moves by the rate times m / sqrt(v)
    (EMAs of the cosine and its square), checked over three steps against the
    recurrence written out, and a tensor with a vanishing gradient keeps its
    moments and its step."""
    beta = 0.9
    rule = _rule(norm=beta)
    shapes = [torch.Size([5, 4]), torch.Size([5]), torch.Size([3, 5])]
    graph = NeuralGraph.from_shapes(shapes)
    gen = torch.Generator().manual_seed(0)
    P = graph.num_scalars
    params, trace = torch.randn(P, generator=gen), torch.randn(P, generator=gen)
    log_step = torch.tensor([0.3, -0.2, 0.1])
    moments = torch.tensor([[0.2, -0.1, 0.0], [0.3, 0.05, 0.0], [0.0, 0.0, 0.0]])
    state = init_feature_state(P)._replace(
        trace=trace, log_step=log_step, adapt_stats=moments
    )
    dead = graph.tensor_position[graph.tensor_id] == 1  # the bias: no gradient
    for _ in range(3):
        grads = torch.randn(P, generator=gen).masked_fill(dead, 0.0)
        g, p, t = (graph.unflatten(v) for v in (grads, params, state.trace))
        cos = torch.zeros(3)
        for pos, i in enumerate(graph.tensor_order):
            cos[pos] = nn.functional.cosine_similarity(
                -g[i].reshape(-1), (p[i] - t[i]).reshape(-1), dim=0
            )
        live = torch.tensor([True, False, True])
        m = torch.where(live, beta * moments[0] + (1 - beta) * cos, moments[0])
        v = torch.where(live, beta * moments[1] + (1 - beta) * cos**2, moments[1])
        expected = log_step + torch.where(live, RATE * m / v.sqrt(), 0.0)
        with torch.no_grad():
            params, state = ng_step(rule, graph, params, grads, state)
        stats = torch.stack([m, v, moments[2]])  # no spike guard: row 2 idle
        torch.testing.assert_close(state.adapt_stats, stats)
        torch.testing.assert_close(state.log_step, expected)
        log_step, moments = expected, stats
    assert state.log_step[1] == -0.2


def test_normalised_steps_grow_at_the_full_rate_on_small_steady_cosines():
    """A gradient mostly orthogonal to the path (cosine about 0.1, steady):
    the raw cosine moves the log step by about 0.1 of the rate per step, the
    normalised signal by the whole rate once its EMAs have warmed up."""
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(200, 64, generator=gen)

    def run(norm: float) -> float:
        w = nn.Parameter(torch.zeros(64))
        opt = NGOptimizer([w], rule=_rule(0.05, norm=norm), fused=False)
        for k in range(200):
            opt.zero_grad()
            # a steady pull along +1 plus a large orthogonal wobble
            (-w.sum()).backward()
            w.grad.add_(10.0 * (noise[k] - noise[k].mean()))
            opt.step()
        return float(opt.state[w]["log_step"])

    raw, normalised = run(0.0), run(0.9)
    assert raw < 0.3 * normalised
    assert normalised > 0.5 * 0.05 * 200


def test_a_gradient_spike_cuts_the_log_step_at_once():
    """A steady slope grows the step; one gradient 100x the usual (10^4 in
    squares, above the threshold of 10^3) cuts the log step by the cut in
    that same step and resets the cosine's mean; a lasting change of scale is
    absorbed after a few steps instead of cutting forever."""
    w = nn.Parameter(torch.zeros(10))
    rule = _rule(0.05, norm=0.9, spike=1e3, spike_cut=2.0)
    opt = NGOptimizer([w], rule=rule, fused=False)

    def step(scale: float) -> float:
        opt.zero_grad()
        (scale * w).sum().backward()
        opt.step()
        return float(opt.state[w]["log_step"])

    for _ in range(30):
        before = step(1.0)
    assert before > 0.5
    after = step(100.0)
    # the cut, plus this step's own move of at most the rate
    assert before - 2.0 - 1e-6 <= after <= before - 2.0 + 0.05 + 1e-6
    assert float(opt.state[w]["adapt_stats"][0]) == 0.0
    cuts = 0
    for _ in range(10):  # the new scale lasts: at most a few more cuts
        previous, now = after, step(100.0)
        cuts += now < previous - 1.0
        after = now
    assert cuts <= 2 and after > -2.0 + 1e-6


def test_steps_grow_on_a_steady_slope():
    w = nn.Parameter(torch.zeros(10))
    opt = NGOptimizer([w], rule=_rule(0.05), fused=False)
    for _ in range(60):
        opt.zero_grad()
        (1.5 * w).sum().backward()
        opt.step()
    # Every entry sees the same features, so every step moves all entries
    # alike, along -g: the cosine is 1 from step 2 on.
    assert float(opt.state[w]["log_step"]) == pytest.approx(0.05 * 59, rel=1e-4)


def test_steps_shrink_when_they_overshoot():
    target = torch.linspace(-1.0, 1.0, 10)
    w = nn.Parameter(target + 1e-5)  # much closer than one step of 1e-3
    opt = NGOptimizer([w], rule=_rule(0.05), fused=False)
    for _ in range(60):
        opt.zero_grad()
        (w - target).square().sum().backward()
        opt.step()
    assert float(opt.state[w]["log_step"]) < -0.5


def test_vanishing_gradients_leave_the_steps_alone():
    """Near a loss of zero the gradient's float32 squares flush to zero while
    its dot product with the path does not: the cosine must not blow up
    (before the guard it read far above 1 and threw the log step to its max)."""
    rule = _rule()
    graph = NeuralGraph.from_shapes([torch.Size([6, 5]), torch.Size([6])])
    gen = torch.Generator().manual_seed(0)
    P = graph.num_scalars
    params = torch.randn(P, generator=gen)
    trace = params - 1e-3 * torch.randn(P, generator=gen)
    grads = 1e-21 * torch.randn(P, generator=gen)
    state = init_feature_state(P)._replace(trace=trace, log_step=torch.zeros(2))
    with torch.no_grad():
        _, new_state = ng_step(rule, graph, params, grads, state)
    assert torch.equal(new_state.log_step, torch.zeros(2))


@needs_kernel
def test_vanishing_gradients_on_the_fused_path():
    w = nn.Parameter(torch.randn(8, 4))
    opt = NGOptimizer([w], rule=_rule(), fused=True)

    def steps(scale):
        for _ in range(2):
            opt.zero_grad()
            (scale * w.sum()).backward()
            opt.step()

    steps(1.0)
    before = float(opt.state[w]["log_step"])
    assert before > 0.1  # real gradients moved it
    steps(1e-21)
    assert opt._plan is not None
    assert float(opt.state[w]["log_step"]) == before


def test_the_clip_bounds_the_log_step():
    w = nn.Parameter(torch.zeros(4))
    opt = NGOptimizer([w], rule=_rule(1.0, log_max=2.0), fused=False)
    for _ in range(10):
        opt.zero_grad()
        w.sum().backward()
        opt.step()
    assert float(opt.state[w]["log_step"]) == 2.0


def test_log_steps_do_not_depend_on_the_loss_scale():
    # untrained (Adam with adaptation): no learned part that could see scales
    rule = UpdateRule(step_size=StepSizeConfig(rate=RATE))
    a, b = _mlp(), _mlp()
    opt_a = NGOptimizer(a.parameters(), rule=rule, fused=False)
    opt_b = NGOptimizer(b.parameters(), rule=rule, fused=False)
    _train(a, opt_a, 8)
    _train(b, opt_b, 8, scale=1000.0)
    torch.testing.assert_close(
        _log_steps(opt_a, a), _log_steps(opt_b, b), atol=1e-4, rtol=0
    )


@needs_kernel
@pytest.mark.parametrize("weight_decay, norm", [(0.0, 0.0), (0.1, 0.0), (0.1, 0.9)])
def test_fused_step_matches_the_reference(weight_decay, norm):
    rule = _rule(norm=norm, spike=1e3 if norm else 0.0)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(36, 5), nn.LayerNorm(5)
    )
    twin = copy.deepcopy(model)

    def groups(m):
        first, *rest = m.parameters()
        return [{"params": [first], "lr": 0.5}, {"params": rest}]

    fused = NGOptimizer(groups(model), rule=rule, fused=True, weight_decay=weight_decay)
    ref = NGOptimizer(groups(twin), rule=rule, fused=False, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(1)
    for _ in range(12):
        x = torch.randn(8, 1, 5, 5, generator=gen)
        paired_step(model, fused, twin, ref, x)
        for p, q in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(fused.state[p]["trace"], ref.state[q]["trace"])
        # per-tensor sums in double (kernel) and float32 (reference): the
        # cosines agree to about 1e-6, times the rate, over 12 steps
        torch.testing.assert_close(
            _log_steps(fused, model), _log_steps(ref, twin), atol=1e-4, rtol=0
        )
        if norm:
            for p, q in zip(model.parameters(), twin.parameters()):
                torch.testing.assert_close(
                    fused.state[p]["adapt_stats"],
                    ref.state[q]["adapt_stats"],
                    atol=1e-5,
                    rtol=0,
                )
    assert fused._plan is not None and ref._plan is None
    assert _log_steps(fused, model).abs().min() > 0.1


@pytest.mark.parametrize("norm", [0.0, 0.9])
@pytest.mark.parametrize("fused", [False, pytest.param(True, marks=needs_kernel)])
def test_state_dict_round_trip_continues_identically(fused, norm):
    rule = _rule(norm=norm)
    model = _mlp()
    opt = NGOptimizer(model.parameters(), rule=rule, fused=fused)
    _train(model, opt, 5)
    saved = copy.deepcopy(opt.state_dict())
    first = saved["state"][0]
    assert first["trace"].shape == model[0].weight.shape
    assert first["log_step"].shape == ()
    assert ("adapt_stats" in first) == (norm > 0)
    if norm:
        assert first["adapt_stats"].shape == (3,) and first["adapt_stats"].any()
    twin = copy.deepcopy(model)
    other = NGOptimizer(twin.parameters(), rule=rule, fused=fused)
    other.load_state_dict(saved)
    _train(model, opt, 3, seed=7)
    _train(twin, other, 3, seed=7)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    assert torch.equal(_log_steps(opt, model), _log_steps(other, twin))
    if norm:
        for p, q in zip(model.parameters(), twin.parameters()):
            assert torch.equal(
                opt.state[p]["adapt_stats"], other.state[q]["adapt_stats"]
            )


def test_state_without_adaptation_starts_it_afresh():
    """A checkpoint of a rule without adaptation loads into one with it: the
    momenta carry over, the trace starts at the current weights and the log
    steps at zero."""
    rule = _rule()
    model = _mlp()
    plain = NGOptimizer(model.parameters(), rule=_without_adaptation(rule))
    _train(model, plain, 3)
    opt = NGOptimizer(model.parameters(), rule=rule)
    opt.load_state_dict(copy.deepcopy(plain.state_dict()))
    for p in model.parameters():
        assert torch.equal(opt.state[p]["momenta"], plain.state[p]["momenta"])
        assert torch.equal(opt.state[p]["trace"], p.detach())
    assert not _log_steps(opt, model).any()
    _train(model, opt, 2)
    assert _log_steps(opt, model).abs().min() > 0


def test_rule_files_keep_the_adaptation(tmp_path):
    rule = _rule(0.07, decay=0.95, log_min=-1.0, norm=0.9)
    loaded = load_rule(save_rule(rule, tmp_path / "rule"))
    assert loaded.config == rule.config
    assert loaded.step_size == rule.step_size
    assert loaded.step_size.enabled


@pytest.mark.parametrize("guarded", [False, True])
def test_meta_gradient_flows_through_adapted_steps(guarded):
    """With autograd on (meta-training), three steps threaded through the
    state give a finite, non-zero gradient in the rule's weights (also with
    the normalised signal and the spike guard, as the default rule has)."""
    extra = {"norm": 0.95, "spike": 1e3} if guarded else {}
    rule = _rule(**extra)
    graph = NeuralGraph.from_shapes([torch.Size([4, 3]), torch.Size([4])])
    gen = torch.Generator().manual_seed(0)
    target = torch.randn(graph.num_scalars, generator=gen)
    params = torch.randn(graph.num_scalars, generator=gen).requires_grad_(True)
    state = init_feature_state(graph.num_scalars)
    for _ in range(3):
        loss = (params - target).square().sum()
        (grad,) = torch.autograd.grad(loss, params, create_graph=True)
        params, state = ng_step(rule, graph, params, grad, state)
        assert state.trace.shape == params.shape and state.log_step.shape == (2,)
    (params - target).square().sum().backward()
    grads = [p.grad for p in rule.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_higher_follows_the_optimizer():
    higher = pytest.importorskip("higher")
    import lopt.integrations.higher  # noqa: F401  (registers the differentiable optimizer)

    rule = _rule()
    model, twin = _mlp(), _mlp()
    opt = NGOptimizer(model.parameters(), rule=rule, fused=False)
    _train(model, opt, 4)
    inner = NGOptimizer(twin.parameters(), rule=rule, fused=False)
    gen = torch.Generator().manual_seed(1)
    with higher.innerloop_ctx(twin, inner, track_higher_grads=False) as (fm, diffopt):
        for _ in range(4):
            x = torch.randn(32, 6, generator=gen)
            y = torch.randint(0, 3, (32,), generator=gen)
            diffopt.step(nn.functional.cross_entropy(fm(x), y))
        for p, q in zip(model.parameters(), fm.parameters()):
            torch.testing.assert_close(p, q)
        torch.testing.assert_close(
            diffopt.ng_state.log_step[diffopt.graph.tensor_position],
            _log_steps(opt, model),
        )


# ------------------------------------------------ the controller's own config
def test_rule_config_describes_the_network_only():
    names = {f.name for f in dataclasses.fields(RuleConfig)}
    assert not {n for n in names if n.startswith("step_adapt")}
    with pytest.raises(TypeError, match="step_adapt_rate"):
        RuleConfig(step_adapt_rate=0.1)


def _as_format_2(path):
    """Rewrite a saved rule's config as lopt wrote it before the controller
    had its own config: ``step_adapt_*`` fields inside ``rule_config``."""
    config_file = path / "config.json"
    config = json.loads(config_file.read_text())
    step_size = config.pop("step_size")
    config["format_version"] = 2
    config["rule_config"].update(
        {old: step_size[new] for old, new in LEGACY_FIELDS.items()}
    )
    config_file.write_text(json.dumps(config))


def test_format_2_rule_files_load_with_their_controller(tmp_path):
    rule = _rule(0.07, decay=0.95, log_min=-1.0, norm=0.9, spike=50.0)
    path = save_rule(rule, tmp_path / "rule")
    _as_format_2(path)
    loaded = load_rule(path)
    assert loaded.config == rule.config
    assert loaded.step_size == rule.step_size
    a, b = _mlp(), _mlp()
    opt_a = NGOptimizer(a.parameters(), rule=rule, fused=False)
    opt_b = NGOptimizer(b.parameters(), rule=loaded, fused=False)
    _train(a, opt_a, 5)
    _train(b, opt_b, 5)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_shipped_default_rule_keeps_its_controller(tmp_path):
    # rules/default/config.json carries the controller in its step_size entry
    # (format 3), with the floor at -2 held at 0 against noise since
    # experiment 19.
    config = json.loads(Path(default_rule_path(), "config.json").read_text())
    rule = load_rule(default_rule_path())
    assert config["format_version"] == 3
    assert rule.step_size.enabled and rule.step_size.log_min == -2.0
    assert rule.step_size.hold == 0.95
    assert rule.step_size == StepSizeConfig(**config["step_size"])
    # The same rule written as format 2 (the controller in rule_config under
    # its step_adapt_* names, which had no hold) loads into the same two parts.
    legacy = dict(config, format_version=2)
    legacy["rule_config"] = {
        **config["rule_config"],
        **{old: config["step_size"][new] for old, new in LEGACY_FIELDS.items()},
    }
    del legacy["step_size"]
    shutil.copytree(default_rule_path(), tmp_path / "old")
    (tmp_path / "old" / "config.json").write_text(json.dumps(legacy))
    old_rule = load_rule(tmp_path / "old")
    assert old_rule.config == rule.config
    assert old_rule.step_size == dataclasses.replace(rule.step_size, hold=0.0)


def test_format_3_rule_with_controller_fields_in_rule_config_is_rejected(tmp_path):
    path = save_rule(_rule(), tmp_path / "rule")
    config = json.loads((path / "config.json").read_text())
    config["rule_config"]["step_adapt_rate"] = 0.1
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="invalid rule_config.*step_adapt_rate"):
        load_rule(path)


def test_meta_training_reads_old_controller_overrides():
    from meta_train.config import MetaTrainConfig
    from meta_train.trainer import rule_configs

    old = MetaTrainConfig(rule={"degree_features": True, "step_adapt_rate": 0.1})
    new = MetaTrainConfig(rule={"degree_features": True}, step_size={"rate": 0.1})
    assert rule_configs(old) == rule_configs(new)
    assert rule_configs(new) == (
        RuleConfig(degree_features=True),
        StepSizeConfig(rate=0.1),
    )


def _next(config: StepSizeConfig, log_step: list[float], cos: list[float]):
    """:func:`next_log_step` with unit gradient and path norms, so that the
    cosine of each tensor is ``cos``."""
    from lopt.optim.step_size import initial_adapt_stats, next_log_step

    s = torch.tensor(log_step, dtype=torch.float64)
    dot = -torch.tensor(cos, dtype=torch.float64)
    ones = torch.ones_like(s)
    stats = initial_adapt_stats(config, len(s), s).double()
    return next_log_step(config, s, dot, ones, ones, stats)[0]


def test_hold_keeps_noise_from_shrinking_steps_below_the_rules_own():
    """With ``hold``, a weak negative signal (noise) does not take a log step
    below 0 nor further down once there; a signal below ``-hold`` (an
    overshoot) does, and positive signals move it as usual."""
    config = StepSizeConfig(rate=0.1, log_min=-2.0, hold=0.5)
    s = _next(
        config, [0.0, 0.0, -0.3, 0.2, 0.01, -0.3], [-0.3, -0.8, -0.3, -0.3, -0.3, 0.5]
    )
    expected = [0.0, -0.08, -0.3, 0.17, 0.0, -0.25]
    torch.testing.assert_close(s, torch.tensor(expected, dtype=torch.float64))
    # hold = 0 is the controller without a dead zone.
    plain = StepSizeConfig(rate=0.1, log_min=-2.0)
    torch.testing.assert_close(
        _next(plain, [0.0, -0.3], [-0.3, -0.3]),
        torch.tensor([-0.03, -0.33], dtype=torch.float64),
    )


def test_hold_lets_a_spike_cut_below_zero():
    config = StepSizeConfig(rate=0.1, log_min=-4.0, hold=1.0, spike=10.0)
    from lopt.optim.step_size import next_log_step

    s = torch.zeros(1, dtype=torch.float64)
    stats = torch.tensor([[0.0], [0.0], [1.0]], dtype=torch.float64)  # |g|^2 EMA 1
    grad_sq = torch.tensor([100.0], dtype=torch.float64)  # 100x its mean: a spike
    out, _ = next_log_step(
        config, s, torch.tensor([0.0]).double(), grad_sq, grad_sq, stats
    )
    assert float(out) == pytest.approx(-2.0)


@pytest.mark.parametrize("hold", [-0.1, 1.5, float("nan")])
def test_invalid_hold_is_named(hold):
    with pytest.raises(ValueError, match=r"step_size\.hold"):
        StepSizeConfig(hold=hold)
