"""The fused CPU step (lopt.optim.fused.dense + lopt/optim/fused/csrc/ng_dense.c)
against the reference step: same updates to float32 rounding, same state, same contract.

Every comparison runs both optimizers on identical copies with identical
gradients, so a wrong kernel (a weight in the wrong place, a missed block, a
wrong fan-out sum) shows up as an update difference far above rounding.
"""

from __future__ import annotations

import collections
import copy

import pytest
import torch
from conftest import paired_step
from torch import nn

from lopt import NGOptimizer
from lopt.graph import NeuralGraph
from lopt.optim.fused import cpu_kernel, dense
from lopt.optim.fused.dense import dense_layout, fused_supported, pack_weights
from lopt.optim.rule import RuleConfig, UpdateRule

pytestmark = pytest.mark.skipif(
    not cpu_kernel.available(), reason="no C compiler: the fused kernel is unavailable"
)


class Block(nn.Module):
    """A pre-norm transformer block."""

    def __init__(self, d: int = 16, heads: int = 2):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class LSTMNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(6, 12, batch_first=True)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        return self.head(self.lstm(x)[0][:, -1])


def _models():
    torch.manual_seed(0)
    return {
        "mlp": (nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 5)), (8, 20)),
        "cnn": (
            nn.Sequential(
                nn.Conv2d(3, 8, 3, padding=1),
                nn.BatchNorm2d(8),
                nn.ReLU(),
                nn.Conv2d(8, 8, 3, stride=2),
                nn.ReLU(),
                nn.Flatten(),  # a linear layer reading a flattened conv map
                nn.Linear(8 * 3 * 3, 4),
            ),
            (4, 3, 8, 8),
        ),
        "transformer": (Block(), (2, 5, 16)),
        "lstm": (LSTMNet(), (3, 7, 6)),
    }


def _pair(model, **kwargs):
    twin = copy.deepcopy(model)
    return (
        (model, NGOptimizer(model.parameters(), fused=True, **kwargs)),
        (twin, NGOptimizer(twin.parameters(), fused=False, **kwargs)),
    )


def _moved(rule: UpdateRule) -> UpdateRule:
    """``rule`` with every weight moved off its initial value: a fresh rule's
    learned output is zero, and the step then skips the kernel."""
    gen = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for p in rule.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return rule


def _lean_rule() -> UpdateRule:
    """The lean rule (``edge_mlp=False``, linear edge head) with every weight
    moved off its initial value: untrained, its head output is zero and the
    edge embedding would not reach the update at all."""
    torch.manual_seed(5)
    rule = UpdateRule(
        RuleConfig(edge_mlp=False, edge_head_hidden=0, degree_features=True)
    )
    with torch.no_grad():
        for p in rule.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return rule


@pytest.mark.parametrize("orthogonal", [False, True])
@pytest.mark.parametrize("rule", ["default", "lean"])
@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer", "lstm"])
def test_fused_updates_equal_the_reference(name, rule, orthogonal):
    """The kernel computes the reference step to float32 rounding. With
    orthogonalised hidden matrices the fused path recovers the rule's update
    from the parameters' change, whose float32 rounding the Newton-Schulz
    iteration amplifies along weak singular directions: 0.1% of the step
    (their equality in exact arithmetic: tests/optim/test_orthogonal.py)."""
    model, shape = _models()[name]
    (m1, fused), (m2, ref) = _pair(
        model,
        rule=_lean_rule() if rule == "lean" else "default",
        orthogonal=orthogonal,
    )
    if orthogonal:
        assert fused.graph is not None and ref.graph is not None  # plans built
        assert fused._ortho.indices == ref._ortho.indices
        # (the mlp and cnn have fewer than three 2-D tensors: none hidden)
        assert bool(ref._ortho.indices) == (name in ("transformer", "lstm"))
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        x = torch.randn(shape, generator=gen)
        paired_step(m1, fused, m2, ref, x, rel=1e-3 if orthogonal else 1e-4)
        for s1, s2 in zip(fused.state.values(), ref.state.values()):
            torch.testing.assert_close(s1["momenta"], s2["momenta"])
            torch.testing.assert_close(s1["second_moment"], s2["second_moment"])
            assert float(s1["step"]) == float(s2["step"])


def _snapshot(model, opt):
    return [p.detach().clone() for p in model.parameters()], copy.deepcopy(
        opt.state_dict()
    )


def _assert_unchanged(model, opt, snapshot):
    """The parameters and optimizer state equal ``snapshot``, bit for bit."""
    params, state = snapshot
    after_params, after_state = _snapshot(model, opt)
    for p0, p1 in zip(params, after_params):
        assert torch.equal(p0, p1)
    for key, s0 in state["state"].items():
        for name, value in s0.items():
            assert torch.equal(value, after_state["state"][key][name]), name


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_nonfinite_gradient_changes_nothing(bad):
    model, shape = _models()["cnn"]
    opt = NGOptimizer(model.parameters(), fused=True)
    model(torch.randn(shape)).square().mean().backward()
    opt.step()  # state exists
    snapshot = _snapshot(model, opt)
    model[3].weight.grad[1, 2, 0, 0] = bad  # an edge tensor, not the first
    opt.step()
    assert opt.skipped_steps == 1
    _assert_unchanged(model, opt, snapshot)
    strict = NGOptimizer(model.parameters(), fused=True, nonfinite="raise")
    with pytest.raises(FloatingPointError, match="non-finite"):
        strict.step()


def _strided_mlp():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    # a weight stored transposed: same values, not contiguous
    w = model[0].weight.detach()
    model[0].weight = nn.Parameter(w.T.contiguous().T)
    return model


@pytest.mark.parametrize("kind", ["float64", "non-contiguous"])
def test_parameters_the_kernel_cannot_read_in_place(kind):
    """Other dtypes and strides go through flat float32 copies; the result is
    the reference path's, and the parameters keep their dtype and strides."""
    model = _strided_mlp()
    if kind == "float64":
        model = model.double()
    else:
        assert not model[0].weight.is_contiguous()
    (m1, fused), (m2, ref) = _pair(model)
    x = torch.randn(4, 6, dtype=next(model.parameters()).dtype)
    for m, o in ((m1, fused), (m2, ref)):
        for _ in range(3):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
    assert fused._plan is not None
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        assert p1.dtype == p2.dtype and p1.stride() == p2.stride()
        torch.testing.assert_close(p1, p2, atol=1e-6, rtol=1e-4)


def test_in_place_step_is_seen_by_autograd():
    """The kernel writes the parameters through raw pointers; their version
    counters still move, so a backward through a graph that saved the old
    values fails loudly instead of using the new ones."""
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = NGOptimizer(model.parameters(), fused=True)
    loss = model(torch.randn(3, 4)).square().sum()
    loss.backward(retain_graph=True)
    versions = [p._version for p in model.parameters()]
    opt.step()
    assert all(p._version > v for p, v in zip(model.parameters(), versions))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


class _CountingKernel:
    """The kernel library, counting the calls of each entry point."""

    def __init__(self, lib):
        self._lib, self.calls = lib, collections.Counter()

    def __getattr__(self, name):
        entry = getattr(self._lib, name)

        def call(*args):
            self.calls[name] += 1
            return entry(*args)

        return call


#: The kernel entry points that read or write the step's tensors.
STEP_ENTRIES = ("ng_norms", "ng_moments", "ng_messages", "ng_update", "ng_update_lean")


def _step_entries(rule) -> tuple[str, ...]:
    """The entry points each fused step of ``rule`` runs on a graph with edges."""
    return STEP_ENTRIES[:3] + (STEP_ENTRIES[3 if rule.config.edge_mlp else 4],)


def test_fused_path_is_the_default_and_is_taken(monkeypatch):
    kernel = _CountingKernel(cpu_kernel.load())
    monkeypatch.setattr(cpu_kernel, "load", lambda: kernel)
    model = _models()["mlp"][0]
    opt = NGOptimizer(model.parameters())
    model(torch.randn(4, 20)).sum().backward()
    before = [p.detach().clone() for p in model.parameters()]
    entries = _step_entries(opt.rule)
    for steps in (1, 2):
        opt.step()
        assert opt._plan is not None
        ran = {name: kernel.calls[name] for name in STEP_ENTRIES}
        assert ran == {name: steps * (name in entries) for name in STEP_ENTRIES}, ran
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
    # fused=False never calls the kernel
    kernel.calls.clear()
    ref = NGOptimizer(model.parameters(), fused=False)
    ref.step()
    assert ref._plan is None and not kernel.calls, kernel.calls


@pytest.mark.parametrize("rule", ["default", "lean"])
def test_a_packing_the_kernel_does_not_expect_raises_before_it_reads(monkeypatch, rule):
    """``ng_weight_count`` / ``ng_lean_weight_count`` are what the kernel
    reads of the packed rule weights; a packing of another size raises
    before any kernel call, instead of reading out of bounds."""
    lib = cpu_kernel.load()
    rule = _lean_rule() if rule == "lean" else _moved(UpdateRule(RuleConfig()))
    lean = not rule.config.edge_mlp
    count = lib.ng_lean_weight_count() if lean else lib.ng_weight_count()
    assert pack_weights(rule).numel() == count
    cpu_kernel.check_weights(lib, pack_weights(rule), lean=lean)
    with pytest.raises(ValueError, match=f"hold {count - 1} values .* reads {count}"):
        cpu_kernel.check_weights(lib, pack_weights(rule)[:-1], lean=lean)
    with pytest.raises(ValueError, match=f"hold {count + 1} values"):
        cpu_kernel.check_weights(lib, torch.zeros(count + 1), lean=lean)

    model, shape = _models()["cnn"]
    opt = NGOptimizer(model.parameters(), rule=rule, fused=True)
    model(torch.randn(shape)).square().mean().backward()
    opt.step()  # state exists
    snapshot = _snapshot(model, opt)
    short = dense.pack_weights
    monkeypatch.setattr(dense, "pack_weights", lambda r: short(r)[:-1])
    kernel = _CountingKernel(lib)
    monkeypatch.setattr(cpu_kernel, "load", lambda: kernel)
    with pytest.raises(ValueError, match="packed rule weights"):
        opt.step()
    assert not set(kernel.calls) & set(STEP_ENTRIES), kernel.calls
    _assert_unchanged(model, opt, snapshot)


def test_param_groups_lr_and_weight_decay():
    model = _models()["mlp"][0]

    def groups(m):
        first, *rest = m.parameters()
        return [
            {"params": [first], "lr": 0.5, "weight_decay": 0.1},
            {"params": rest, "lr": 2.0},
        ]

    twin = copy.deepcopy(model)
    fused = NGOptimizer(groups(model), fused=True)
    ref = NGOptimizer(groups(twin), fused=False)
    x = torch.randn(8, 20)
    for m, o in ((model, fused), (twin, ref)):
        m(x).square().mean().backward()
        o.step()
    for p1, p2 in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p1, p2, atol=1e-7, rtol=1e-5)


def test_missing_gradient_takes_the_reference_path_and_leaves_it_alone():
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2), nn.Linear(2, 2))
    opt = NGOptimizer(model.parameters(), fused=True)
    frozen = model[2].weight.detach().clone()
    model[1](model[0](torch.randn(3, 4))).sum().backward()  # model[2] unused
    opt.step()
    assert torch.equal(model[2].weight, frozen)


def test_state_dict_round_trip_continues_identically():
    model, shape = _models()["cnn"]
    opt = NGOptimizer(model.parameters(), fused=True)
    x = torch.randn(shape)
    for _ in range(3):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    twin = copy.deepcopy(model)
    other = NGOptimizer(twin.parameters(), fused=True)
    other.load_state_dict(copy.deepcopy(opt.state_dict()))
    for m, o in ((model, opt), (twin, other)):
        o.zero_grad()
        m(x).square().mean().backward()
        o.step()
    for p1, p2 in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p1, p2)


def test_fused_true_says_why_it_does_not_apply():
    rule = UpdateRule(RuleConfig(edge_dim=8))
    model = nn.Linear(3, 2)
    assert "edge_dim" in fused_supported(
        rule, NeuralGraph.from_parameters(list(model.parameters())), torch.device("cpu")
    )
    with pytest.raises(ValueError, match="fused=True.*edge_dim"):
        NGOptimizer(model.parameters(), rule=rule, fused=True)
    # None falls back silently and still steps
    opt = NGOptimizer(model.parameters(), rule=rule)
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    assert opt._plan is None


def test_invalid_fused_value():
    with pytest.raises(ValueError, match="Invalid fused"):
        NGOptimizer(nn.Linear(2, 2).parameters(), fused="yes")


def test_every_shape_inferred_graph_is_dense():
    shapes = [(8, 3, 3, 3), (8,), (8,), (16, 8, 3, 3), (16,), (10, 16 * 4), (10,), (5,)]
    blocks = dense_layout(NeuralGraph.from_shapes(shapes))
    assert blocks is not None and len(blocks) == 3
    flatten = blocks[2]
    assert (flatten.sources, flatten.inner) == (16, 4)  # 4 features per channel
