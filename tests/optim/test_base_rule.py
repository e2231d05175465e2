"""The base rule: a fresh rule's update is the Adam ratio, and the step skips
the graph network for it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lopt import NGOptimizer, default_rule_path, load_rule
from lopt.graph import NeuralGraph
from lopt.optim.functional import init_state, ng_step
from lopt.optim.optimizer import SHIPPED_RULES


def _net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(5, 16),
        nn.Tanh(),
        nn.Linear(16, 16),
        nn.LayerNorm(16),
        nn.Linear(16, 3),
    )


def test_shipped_base_rule_has_no_learned_output():
    assert "base" in SHIPPED_RULES
    base = load_rule(default_rule_path("base"))
    default = load_rule(default_rule_path("default"))
    assert base.learned_output_is_zero and not default.learned_output_is_zero
    # the default rule's architecture and controller, fresh weights
    assert base.config == default.config and base.step_size == default.step_size
    with torch.no_grad():
        base.edge_head.out.bias[1] = 1e-3  # any learned output at all
    assert not base.learned_output_is_zero


@pytest.mark.parametrize("steps", [1, 7])
def test_fast_path_equals_the_full_pipeline_bit_for_bit(steps):
    """Without autograd the graph network is skipped; with it (meta-training)
    the network runs. Both give the same bits."""
    rule = load_rule(default_rule_path("base"))
    params = list(_net().parameters())
    graph = NeuralGraph.from_parameters(params)
    gen = torch.Generator().manual_seed(3)
    fast = slow = graph.flatten([p.detach() for p in params])
    s_fast = s_slow = init_state(graph)
    for _ in range(steps):
        grads = torch.randn(graph.num_scalars, generator=gen)
        with torch.no_grad():
            fast, s_fast = ng_step(rule, graph, fast, grads, s_fast)
        with torch.enable_grad():
            slow, s_slow = ng_step(rule, graph, slow, grads, s_slow)
        slow, s_slow = slow.detach(), s_slow.detach()
    assert torch.equal(fast, slow)
    assert not torch.equal(fast, graph.flatten([p.detach() for p in params]))


def test_optimizer_takes_the_reference_path_for_the_base_rule():
    net = _net()
    opt = NGOptimizer(net.parameters(), rule="base")
    x = torch.randn(32, 5)
    first = None
    for _ in range(30):
        opt.zero_grad()
        loss = net(x).square().mean()
        first = float(loss) if first is None else first
        loss.backward()
        opt.step()
    assert opt._plan is None  # no fused kernel: nothing for it to compute
    assert float(net(x).square().mean()) < 0.5 * first
    with pytest.raises(ValueError, match="learned output is zero"):
        NGOptimizer(_net().parameters(), rule="base", fused=True)
