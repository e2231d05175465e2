"""Differentiable :class:`~lopt.optim.optimizer.NGOptimizer` for ``higher``.

Importing this module registers :class:`DifferentiableNGOptimizer` with
``higher``, so that

    >>> with higher.innerloop_ctx(model, NGOptimizer(model.parameters())) as (
    ...     fmodel, diffopt):
    ...     diffopt.step(loss_fn(fmodel(x), y))

unrolls the learned optimizer with autograd on: the fast weights are functions
of the rule's weights, and meta-gradients flow into ``opt.rule``. The step is
:func:`lopt.optim.functional.ng_step`, the same function the in-place optimizer
calls, so both follow the same trajectory and meta-gradients through
``higher`` equal those of an unroll written directly on :func:`ng_step`.
``import lopt`` does not import this module (``higher`` is an optional
dependency, the ``higher`` extra): ``import lopt.integrations.higher`` or
``lopt.DifferentiableNGOptimizer`` does.
"""

from __future__ import annotations

from typing import Any

import higher
import torch
from higher.optim import DifferentiableOptimizer

from lopt.graph import NeuralGraph
from lopt.optim.features import MOMENTUM_DECAYS, FeatureState
from lopt.optim.functional import flat_gradients, init_state, ng_step
from lopt.optim.optimizer import (
    NGOptimizer,
    as_param_dtype,
    cooldown_factor,
    gradient_is_finite,
    group_ortho_plan,
    group_values,
)

__all__ = ["DifferentiableNGOptimizer"]


class DifferentiableNGOptimizer(DifferentiableOptimizer):
    """Differentiable counterpart of :class:`~lopt.optim.optimizer.NGOptimizer`.

    Created by ``higher`` (``higher.innerloop_ctx`` or
    ``higher.optim.get_diff_optim``) from an existing ``NGOptimizer``; not
    meant to be constructed directly. It keeps:

    * ``rule``: the original optimizer's rule itself (not a copy), so that
      meta-gradients reach its parameters;
    * ``graph``: the neural graph of the optimizer's parameters, in the same
      order as ``NGOptimizer`` (param groups in order), built from their shapes;
    * ``ng_state``: the flat :class:`~lopt.optim.features.FeatureState`, starting from
      a detached copy of the original optimizer's state (zero state if it has
      taken no step) and carrying autograd history through the unroll.

    Param-group ``lr`` and ``weight_decay`` may be overridden with tensors
    (``override=``), which then receive gradients too. Gradients that are
    ``None`` (parameters the loss does not depend on) leave their parameters
    and state untouched, as in ``NGOptimizer``. Non-finite gradients are
    handled as the original optimizer's ``nonfinite`` says: the step is skipped
    (and counted in :attr:`skipped_steps`) or ``FloatingPointError`` is raised.

    Args:
        other: the ``NGOptimizer`` to copy the rule, settings and state from.
        reference_params: the parameters of the module ``other`` optimizes.
        fmodel: a patched stateless module with a view on its fast weights.
        device: device for the graph and state (default: the parameters').
        override: per-group setting overrides, see ``higher``.
        grad_callback: function applied to the list of gradients every step.
        track_higher_grads: if ``False``, the state is detached after each step
            ("test mode": no history is kept).
        **kwargs: passed to ``higher.optim.DifferentiableOptimizer``.
    """

    def __init__(
        self,
        other: NGOptimizer,
        reference_params,
        fmodel=None,
        device: torch.device | str | None = None,
        override: dict[str, list[Any]] | None = None,
        grad_callback=None,
        track_higher_grads: bool = True,
        **kwargs,
    ) -> None:
        if not isinstance(other, NGOptimizer):
            raise TypeError(
                "DifferentiableNGOptimizer needs an NGOptimizer, got "
                f"{type(other).__name__}"
            )
        reference_params = list(reference_params)
        super().__init__(
            other,
            reference_params,
            fmodel=fmodel,
            device=device,
            override=override,
            grad_callback=grad_callback,
            track_higher_grads=track_higher_grads,
            **kwargs,
        )
        self.rule = other.rule
        self.nonfinite = other.nonfinite
        #: Number of steps skipped because a gradient was not finite.
        self.skipped_steps = 0
        # NGOptimizer's order: every group's params, groups in order.
        original = [p for group in other.param_groups for p in group["params"]]
        if device is None:
            device = original[0].device if original else torch.device("cpu")
        self.graph = other.structure_graph(original).to(device)
        self.ng_state = _initial_state(other, original, self.graph, device)
        self.total_steps = other.total_steps
        self.ortho = group_ortho_plan(other.param_groups, self.graph, other.orthogonal)

    def _update(self, grouped_grads: list[list[torch.Tensor | None]], **kwargs) -> None:
        """One :func:`~lopt.optim.functional.ng_step` over all groups' fast weights.

        Args:
            grouped_grads: per group, the gradient of each parameter (``None``
                where the loss does not depend on it).
            **kwargs: unused (``higher``'s interface).
        """
        params = [p for group in self.param_groups for p in group["params"]]
        grads = [g for group_grads in grouped_grads for g in group_grads]
        if all(g is None for g in grads):
            return
        graph = self.graph
        flat_grad, mask = flat_gradients(graph, params, grads)
        if not gradient_is_finite(self, flat_grad):
            return
        lr, weight_decay = group_values(self.param_groups, graph)
        lr = lr * cooldown_factor(int(self.ng_state.step), self.total_steps)
        new_params, state = ng_step(
            self.rule,
            graph,
            graph.flatten(params),
            flat_grad,
            self.ng_state,
            lr,
            weight_decay,
            mask,
            self.ortho,
        )
        if not self._track_higher_grads:
            state = state.detach()
        self.ng_state = state
        new_list = graph.unflatten(new_params)
        momenta = graph.unflatten(state.momenta)
        second = graph.unflatten(state.second_moment)
        k = 0
        for group_idx, group in enumerate(self.param_groups):
            for p_idx, p in enumerate(group["params"]):
                group["params"][p_idx] = as_param_dtype(new_list[k], p)
                self.state[group_idx][p_idx] = {
                    "step": state.step,
                    "momenta": momenta[k],
                    "second_moment": second[k],
                }
                k += 1


def _initial_state(
    other: NGOptimizer,
    params: list[torch.Tensor],
    graph: NeuralGraph,
    device: torch.device | str,
) -> FeatureState:
    """A detached copy of ``other``'s state over ``params`` in graph order."""
    flat = getattr(other, "_flat", None)
    layout = tuple(id(p) for p in params)
    if flat is not None and other._graph is not None and other._layout == layout:
        return flat.map(lambda t: t.detach().clone().to(device))
    # The flat buffers are missing or stale (e.g. after add_param_group): gather
    # what per-parameter state there is; parameters without state start at zero.
    state = init_state(graph, device)
    momenta = graph.unflatten(state.momenta)
    second = graph.unflatten(state.second_moment)
    steps = []
    for p, m, v in zip(params, momenta, second):
        saved = other.state.get(p, {})
        if "momenta" in saved:
            m.copy_(saved["momenta"].detach().reshape(len(MOMENTUM_DECAYS), *p.shape))
            v.copy_(saved["second_moment"].detach().reshape(p.shape))
        if "step" in saved:
            steps.append(float(saved["step"]))
    state.step.fill_(max(steps, default=0.0))
    return state


higher.register_optim(NGOptimizer, DifferentiableNGOptimizer)
