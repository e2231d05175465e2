"""``NGOptimizer``: the learned neural-graph optimizer, a ``torch.optim.Optimizer``."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer

from lopt.features import FeatureState
from lopt.functional import flat_gradients, init_state, ng_step
from lopt.graph import NeuralGraph
from lopt.rule import UpdateRule, load_rule

__all__ = ["NGOptimizer", "default_rule_path", "resolve_rule"]

_NONFINITE_MODES = ("skip", "raise")


def default_rule_path() -> str:
    """Directory of the rule that ships inside the package."""
    return os.path.join(os.path.dirname(__file__), "rules", "default")


def resolve_rule(rule: str | os.PathLike | UpdateRule) -> UpdateRule:
    """``"default"``, a rule directory, or an :class:`UpdateRule` -> a rule."""
    if isinstance(rule, UpdateRule):
        return rule
    if isinstance(rule, (str, os.PathLike)):
        return load_rule(default_rule_path() if rule == "default" else rule)
    raise ValueError(
        f"Invalid rule: {rule!r} (expected 'default', a path or an UpdateRule)"
    )


class NGOptimizer(Optimizer):
    r"""Learned optimizer that sees the network as a neural graph.

    Each step, the parameters of all param groups (in order), their gradients
    and momenta become features on a :class:`~lopt.graph.NeuralGraph` (neurons
    are nodes, weights are edges, built once); a graph network
    (:class:`~lopt.rule.UpdateRule`) predicts one update per weight and per
    bias / norm parameter. The maths lives in :func:`lopt.functional.ng_step`;
    this class only gathers tensors and writes results back in place.

    Args:
        params: iterable of parameters or dicts defining param groups.
        lr (float, optional): multiplier of the rule's step (the rule's own
            scale is learned). LR schedulers act on it. (default: ``1.0``)
        weight_decay (float, optional): decoupled weight decay, scaled like
            AdamW at the rule's base step:
            ``p -= lr * rule.config.step_scale * weight_decay * p``.
            (default: ``0.0``)
        rule (str, path or UpdateRule, optional): ``"default"`` for the rule
            shipped with lopt, a directory saved by :func:`lopt.save_rule`, or
            a rule object. (default: ``"default"``)
        nonfinite (str, optional): what to do when a gradient holds NaN or
            inf: ``"skip"`` the step (parameters and state untouched, counted
            in :attr:`skipped_steps`) or ``"raise"`` ``FloatingPointError``.
            (default: ``"skip"``)

    State (per parameter, float32 whatever the parameter dtype; views into
    flat buffers shared by all parameters):
        - ``step``: number of steps applied (shared by all parameters);
        - ``momenta``: ``(len(MOMENTUM_DECAYS), *shape)`` gradient EMAs;
        - ``second_moment``: ``shape`` EMA of squared gradients.

    Example:
        >>> opt = NGOptimizer(model.parameters())
        >>> loss_fn(model(x), y).backward()
        >>> opt.step()
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1.0,
        *,
        weight_decay: float = 0.0,
        rule: str | os.PathLike | UpdateRule = "default",
        nonfinite: str = "skip",
    ):
        _check_number("learning rate", lr)
        _check_number("weight_decay value", weight_decay)
        if nonfinite not in _NONFINITE_MODES:
            raise ValueError(
                f"Invalid nonfinite: {nonfinite!r} (expected one of {_NONFINITE_MODES})"
            )
        self.rule = resolve_rule(rule)
        self.nonfinite = nonfinite
        #: Number of steps skipped because a gradient was not finite.
        self.skipped_steps = 0
        self._graph: NeuralGraph | None = None
        self._flat: FeatureState | None = None
        self._layout: tuple[int, ...] = ()
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))

    # --------------------------------------------------------------- groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        for key in ("lr", "weight_decay"):
            if key in param_group:
                name = "learning rate" if key == "lr" else "weight_decay value"
                _check_number(name, param_group[key])
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        for p in params:
            if isinstance(p, torch.Tensor) and not p.is_floating_point():
                raise ValueError(
                    f"Invalid parameter dtype: {p.dtype} (need a float dtype)"
                )
        super().add_param_group({**param_group, "params": params})
        # The graph spans every group: rebuild it (keeping state) at the next step.
        self._graph = None

    def _all_params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    @property
    def graph(self) -> NeuralGraph:
        """The neural graph of all parameters (built on first use)."""
        self._ensure_graph(self._all_params())
        assert self._graph is not None
        return self._graph

    def _ensure_graph(self, params: list[torch.Tensor]) -> None:
        layout = tuple(id(p) for p in params)
        if self._graph is not None and layout == self._layout:
            return
        devices = {p.device for p in params}
        if len(devices) > 1:
            raise ValueError(
                f"Invalid parameters: all must be on one device, got {devices}"
            )
        self._rebuild({p: self.state.get(p, {}) for p in params}, params)

    def _rebuild(self, source: dict[torch.Tensor, dict], params: list[torch.Tensor]):
        """(Re)create the graph and the flat state buffers, filling them from
        per-parameter state in ``source``; then point ``self.state`` at views."""
        device = params[0].device if params else torch.device("cpu")
        graph = NeuralGraph.from_parameters(params).to(device)
        flat = init_state(graph, device)
        steps = [float(s["step"]) for s in source.values() if "step" in s]
        flat.step.fill_(max(steps, default=0.0))
        for p, m, v in zip(
            params, *self._views(graph, flat.momenta, flat.second_moment)
        ):
            saved = source.get(p, {})
            if "momenta" in saved:
                m.copy_(saved["momenta"].reshape(m.shape))
                v.copy_(saved["second_moment"].reshape(v.shape))
            self.state[p] = {"step": flat.step, "momenta": m, "second_moment": v}
        self._graph, self._flat = graph, flat
        self._layout = tuple(id(p) for p in params)
        self.rule.to(device)

    @staticmethod
    def _views(graph: NeuralGraph, momenta: torch.Tensor, second: torch.Tensor):
        return graph.unflatten(momenta), graph.unflatten(second)

    # ----------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        """Perform one optimization step.

        Args:
            closure (Callable, optional): re-evaluates the model and returns
                the loss.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = self._all_params()
        grads = [p.grad for p in params]
        if all(g is None for g in grads):
            return loss
        if any(g is not None and g.is_sparse for g in grads):
            raise RuntimeError("NGOptimizer does not support sparse gradients")
        self._ensure_graph(params)
        graph, flat = self._graph, self._flat
        flat_grad, mask = flat_gradients(graph, params, grads)
        if not gradient_is_finite(self, flat_grad):
            return loss
        lr, weight_decay = self._group_values(graph)
        new_params, new_state = ng_step(
            self.rule,
            graph,
            graph.flatten(params),
            flat_grad,
            flat,
            lr,
            weight_decay,
            mask,
        )
        _write_back(params, grads, graph.unflatten(new_params))
        flat.step.copy_(new_state.step)
        flat.momenta.copy_(new_state.momenta)
        flat.second_moment.copy_(new_state.second_moment)
        return loss

    def _group_values(self, graph: NeuralGraph):
        lrs = [float(g["lr"]) for g in self.param_groups]
        wds = [float(g["weight_decay"]) for g in self.param_groups]
        if len(set(lrs)) == 1 and len(set(wds)) == 1:
            return lrs[0], wds[0]
        sizes = [len(g["params"]) for g in self.param_groups]
        per_param = lambda values: [v for v, n in zip(values, sizes) for _ in range(n)]  # noqa: E731
        return (
            graph.per_scalar(per_param(lrs), torch.float32),
            graph.per_scalar(per_param(wds), torch.float32),
        )

    # ----------------------------------------------------------- state dict
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["ng"] = {"skipped_steps": self.skipped_steps}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load state; momenta stay float32 even for low-precision parameters."""
        saved_state = state_dict["state"]
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        super().load_state_dict(state_dict)
        params = self._all_params()
        source = {p: saved_state.get(i, {}) for i, p in zip(saved_ids, params)}
        self._rebuild(source, params)
        self.skipped_steps = int(state_dict.get("ng", {}).get("skipped_steps", 0))


def _write_back(
    params: list[torch.Tensor],
    grads: list[torch.Tensor | None],
    new: list[torch.Tensor],
) -> None:
    """Write a step's float32 results ``new`` into ``params`` in place.

    The step works on float32 copies of the parameters, exact for float32 and
    16-bit parameters but rounded for float64 ones. So a parameter without a
    gradient is not written at all (it stays bit-identical whatever its dtype),
    and a float64 parameter gets the float32 step added instead of being
    overwritten by its float32-rounded value (which would drop the low bits of
    its value at every step, and move it even when its step is zero).
    """
    targets, values = [], []
    for p, g, n in zip(params, grads, new):
        if g is None:
            continue
        if p.dtype == torch.float64:
            n = p + (n - p.float())  # p.float() is the value the step started from
        targets.append(p)
        values.append(n)
    if targets:
        torch._foreach_copy_(targets, values)


def gradient_is_finite(owner: Any, flat_grad: torch.Tensor) -> bool:
    """Apply ``owner.nonfinite`` to a flat gradient: ``True`` to go on, ``False``
    to skip the step (counted in ``owner.skipped_steps``), or raise.

    Shared by :class:`NGOptimizer` and its ``higher`` counterpart.
    """
    if bool(torch.isfinite(flat_grad.detach()).all()):
        return True
    if owner.nonfinite == "raise":
        raise FloatingPointError("NGOptimizer: non-finite gradient")
    owner.skipped_steps += 1
    return False


def _check_number(name: str, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"Invalid {name}: {value}")
        value = value.item()
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"Invalid {name}: {value}")
