"""``NGOptimizer``: the learned neural-graph optimizer, a ``torch.optim.Optimizer``."""

from __future__ import annotations

import math
import os
import sys
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.autograd.graph import increment_version
from torch.optim import Optimizer

from lopt.graph import NeuralGraph, Unsupported
from lopt.optim.dtensor import copy_into, full_tensors, is_dtensor
from lopt.optim.features import FeatureState
from lopt.optim.functional import flat_gradients, init_state, ng_step
from lopt.optim.fused import cpu_kernel
from lopt.optim.fused.dense import DensePlan, fused_step, fused_supported
from lopt.optim.orthogonal import (
    ORTHOGONAL_KEY,
    OrthoGroup,
    OrthoPlan,
    hidden_matrices,
    ortho_plan,
    orthogonalize_steps,
    snapshot,
)
from lopt.optim.rule import UpdateRule, load_rule
from lopt.optim.step_size import initial_adapt_stats

__all__ = [
    "NGOptimizer",
    "SHIPPED_RULES",
    "default_rule_path",
    "resolve_rule",
    "structure_order",
]

#: Rules inside the package, by name: ``"default"``, the lean rule (cheap
#: step), ``"full"``, the previous default it was distilled from (an edge
#: MLP and a hidden layer in the edge head: about 1.8x the step's arithmetic),
#: and ``"base"``, the default's config with fresh weights: no learned output,
#: Adam's ratio scaled by the step-size controller (the benchmarks' untrained
#: ablation; the step skips the graph network for it).
SHIPPED_RULES = ("default", "full", "base")

_NONFINITE_MODES = ("skip", "raise")
#: Where the neural graph's structure comes from (``NGOptimizer(graph=...)``).
_GRAPH_MODES = ("shapes", "traced")
#: Share of ``total_steps`` at the end over which the step decays linearly to
#: zero (the cooldown of a warmup-stable-decay schedule; see
#: :func:`cooldown_factor`).
COOLDOWN_FRACTION = 0.2


#: A group ``lr`` below this looks like an Adam learning rate brought over,
#: not a multiplier of the learned step (see :func:`_warn_adam_like_lr`).
ADAM_LIKE_LR = 0.05


def _warn_adam_like_lr(lr: Any, where: str) -> bool:
    """Warn (and return ``True``) when ``lr`` is positive but below
    :data:`ADAM_LIKE_LR`: a learning rate meant for Adam makes the learned
    rule's steps that many times smaller, and it would crawl silently."""
    value = float(lr)
    if not 0.0 < value < ADAM_LIKE_LR:
        return False
    warnings.warn(
        f"NGOptimizer: lr={value:g} {where}. NGOptimizer's lr multiplies the "
        "learned step (default 1.0; the rule's own base step is Adam's 1e-3), so "
        f"lr={value:g} makes every step {1 / value:.0f}x smaller than the rule's. "
        "Leave lr at 1.0 and schedule it as a multiplier (LR schedulers do), "
        "instead of writing Adam-style absolute values into param_group['lr'].",
        UserWarning,
        stacklevel=_user_stacklevel(),
    )
    return True


def cooldown_factor(done: int, total_steps: int | None) -> float:
    """Multiplier of the step that follows ``done`` applied steps: 1, then
    linear to zero over the last :data:`COOLDOWN_FRACTION` of
    ``total_steps`` (1 throughout for ``None``; 0 past the end)."""
    if total_steps is None:
        return 1.0
    start = (1.0 - COOLDOWN_FRACTION) * total_steps
    if done < start:
        return 1.0
    return max(0.0, (total_steps - done) / max(1.0, total_steps - start))


def default_rule_path(name: str = "default") -> str:
    """Directory of a rule that ships inside the package (see
    :data:`SHIPPED_RULES`)."""
    if name not in SHIPPED_RULES:
        raise ValueError(f"Invalid rule: {name!r} (shipped: {SHIPPED_RULES})")
    return os.path.join(os.path.dirname(__file__), "rules", name)


def resolve_rule(rule: str | os.PathLike | UpdateRule) -> UpdateRule:
    """A shipped rule's name (:data:`SHIPPED_RULES`), a rule directory, or an
    :class:`UpdateRule` -> a rule."""
    if isinstance(rule, UpdateRule):
        return rule
    if isinstance(rule, (str, os.PathLike)):
        if isinstance(rule, str) and rule in SHIPPED_RULES:
            return load_rule(default_rule_path(rule))
        return load_rule(rule)
    raise ValueError(
        f"Invalid rule: {rule!r} (expected one of {SHIPPED_RULES}, a path or an "
        "UpdateRule)"
    )


class NGOptimizer(Optimizer):
    r"""Learned optimizer that sees the network as a neural graph.

    Each step, the parameters of all param groups (in order), their gradients
    and momenta become features on a :class:`~lopt.graph.NeuralGraph` (neurons
    are nodes, weights are edges, built once); a graph network
    (:class:`~lopt.optim.rule.UpdateRule`) predicts one update per weight and per
    bias / norm parameter. The maths lives in :func:`lopt.optim.functional.ng_step`;
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
            shipped with lopt (the lean rule), ``"full"`` for the larger rule
            it was distilled from, ``"base"`` for the default's config without
            a learned output (see :data:`SHIPPED_RULES`), a directory saved by
            :func:`lopt.save_rule`, or a rule object. (default: ``"default"``)
        nonfinite (str, optional): what to do when a gradient holds NaN or
            inf: ``"skip"`` the step (parameters and state untouched, counted
            in :attr:`skipped_steps`) or ``"raise"`` ``FloatingPointError``.
            (default: ``"skip"``)
        fused (bool, optional): run the step through the fused CPU kernel
            (:mod:`lopt.optim.fused.dense`: dense layers as tensors, three passes over
            memory; built with the system C compiler on first use), which
            computes the reference step's updates to float32 rounding and is
            several times faster. ``None`` uses it wherever it applies (CPU
            parameters, a rule of the shipped widths, a C compiler) and
            falls back to the reference path otherwise; ``True`` raises if it
            does not apply; ``False`` always takes the reference path.
            Steps where some parameter has no gradient take the reference
            path. (default: ``None``)
        total_steps (int, optional): the length of training, when known (as
            for a cosine schedule). The step then decays linearly to zero
            over the last 20% of it (:func:`cooldown_factor`): the learned
            rule has no horizon of its own, and ending on small steps is
            what lets a run settle. Past ``total_steps`` the step is zero
            (with a warning). ``None``: no decay. (default: ``None``)
        orthogonal (bool, optional): orthogonalise the updates of hidden
            weight matrices, keeping their size
            (:mod:`lopt.optim.orthogonal`). Which 2-D tensors are hidden is
            guessed (all but the first and the last 2-D tensor in parameter
            order); a param group's ``"orthogonal"`` key (``True`` or
            ``False``) decides for its own 2-D tensors. (default: ``True``)
        model (nn.Module, optional): the network being trained. The neural
            graph then follows the module's own order of parameters
            (``model.parameters()``), whatever the order or grouping of
            ``params`` (decay / no-decay groups list every matrix first and
            every norm gain last). Every parameter optimized must belong to
            ``model``. Without it, named parameters
            (``model.named_parameters()``, or groups of ``(name, tensor)``
            pairs) are put in an order that depends on their names only
            (:func:`structure_order`), and plain tensors are taken in the
            order given, with a warning when the groups look like a
            decay / no-decay split. (default: ``None``)
        graph (str, optional): where the neural graph's structure comes from,
            with ``model``. ``"shapes"``: shape inference over the parameters
            in the model's order (:meth:`NeuralGraph.from_shapes`).
            ``"traced"``: the module's exact graph from its ``torch.fx``
            trace (:meth:`NeuralGraph.from_module`: residual sums merge
            neurons, norms attach to the neurons they normalise); when the
            trace is unsupported (attention, recurrent layers, ...) it falls
            back to ``"shapes"`` with a warning that says why. The default
            is ``"shapes"``: the shipped rule was found insensitive to the
            parameters' order, and on a ResNet the traced graph did no better
            (experiment 18). (default: ``"shapes"``)

    State (per parameter, float32 whatever the parameter dtype; views into
    flat buffers shared by all parameters):
        - ``step``: number of steps applied (shared by all parameters);
        - ``momenta``: ``(len(MOMENTUM_DECAYS), *shape)`` gradient EMAs;
        - ``second_moment``: ``shape`` EMA of squared gradients;
        - ``trace`` (``shape``) and ``log_step`` (a scalar), for rules whose
          step-size controller is on (``rule.step_size.enabled``): an EMA of
          the parameter's past values and the log of its step multiplier
          (see :func:`lopt.optim.step_size.adapt_step_sizes`);
        - ``adapt_stats`` (``(3,)``), for those with ``rule.step_size.norm > 0``
          or ``rule.step_size.spike > 0``: EMAs of the cosine that moves the
          log step, of its square, and of the squared gradient norm (see
          :func:`lopt.optim.step_size.next_log_step`).

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
        fused: bool | None = None,
        total_steps: int | None = None,
        orthogonal: bool = True,
        model: nn.Module | None = None,
        graph: str = "shapes",
    ):
        _check_number("learning rate", lr)
        if model is not None and not isinstance(model, nn.Module):
            raise ValueError(
                f"Invalid model: expected a torch.nn.Module, got {type(model).__name__}"
            )
        if graph not in _GRAPH_MODES:
            raise ValueError(
                f"Invalid graph: {graph!r} (expected one of {_GRAPH_MODES})"
            )
        if graph == "traced" and model is None:
            raise ValueError(
                "Invalid graph: 'traced' needs the module (pass model=model)"
            )
        #: The module whose fx trace gives the graph (``graph="traced"``),
        #: ``None`` once its trace turned out unsupported.
        self._traced_model = model if graph == "traced" else None
        #: Position of each of ``model``'s parameters in its own order, by id.
        self._model_order: dict[int, int] | None = None
        if model is not None:
            self._model_order = {id(p): i for i, p in enumerate(model.parameters())}
        self._warned_order = False
        if total_steps is not None and (
            isinstance(total_steps, bool)
            or not isinstance(total_steps, int)
            or total_steps < 1
        ):
            raise ValueError(
                f"Invalid total_steps: {total_steps!r} (need a positive int or None)"
            )
        if not isinstance(orthogonal, bool):
            raise ValueError(f"Invalid orthogonal: {orthogonal!r} (need True or False)")
        self.total_steps = total_steps
        self.orthogonal = orthogonal
        self._ortho = OrthoPlan((), ())
        self._warned_past_end = False
        self._warned_lr = _warn_adam_like_lr(lr, "was passed to the constructor")
        self._lr_checked = False
        _check_number("weight_decay value", weight_decay)
        if nonfinite not in _NONFINITE_MODES:
            raise ValueError(
                f"Invalid nonfinite: {nonfinite!r} (expected one of {_NONFINITE_MODES})"
            )
        if fused not in (None, True, False):
            raise ValueError(f"Invalid fused: {fused!r} (expected None, True or False)")
        self.rule = resolve_rule(rule)
        self.nonfinite = nonfinite
        self.fused = fused
        self._plan: DensePlan | None = None
        if fused:  # what can be checked before the graph exists
            reason = fused_supported(
                self.rule, NeuralGraph.from_shapes([]), torch.device("cpu")
            )
            if reason is None and cpu_kernel.load() is None:
                reason = "the fused CPU kernel could not be built (see the warning)"
            if reason is not None:
                raise ValueError(f"NGOptimizer(fused=True) does not apply: {reason}")
        #: Number of steps skipped because a gradient was not finite.
        self.skipped_steps = 0
        self._graph: NeuralGraph | None = None
        self._flat: FeatureState | None = None
        self._layout: tuple[int, ...] = ()
        self._sharded = False
        self._float64: list[int] = []
        # ``momentum=None``: the rule reads its momenta as features and has no
        # momentum hyperparameter. The key is there so that schedulers which
        # cycle momentum (OneCycleLR, CyclicLR) get past their own check and
        # the first step can say what to pass instead (_check_no_momentum).
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=None))

    # --------------------------------------------------------------- groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        for key in ("lr", "weight_decay"):
            if key in param_group:
                name = "learning rate" if key == "lr" else "weight_decay value"
                _check_number(name, param_group[key])
        if "lr" in param_group and not getattr(self, "_warned_lr", False):
            self._warned_lr = _warn_adam_like_lr(param_group["lr"], "is a group's lr")
        mark = param_group.get(ORTHOGONAL_KEY)
        if mark is not None and not isinstance(mark, bool):
            raise ValueError(
                f"Invalid {ORTHOGONAL_KEY!r} in a param group: {mark!r} "
                "(need True, False or None)"
            )
        _check_no_momentum([param_group])
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        for item in params:
            p = item[1] if isinstance(item, tuple) and len(item) == 2 else item
            if isinstance(p, torch.Tensor) and not p.is_floating_point():
                raise ValueError(
                    f"Invalid parameter dtype: {p.dtype} (need a float dtype)"
                )
            if self._model_order is not None and id(p) not in self._model_order:
                name = f" {item[0]!r}" if isinstance(item, tuple) else ""
                raise ValueError(
                    f"Invalid parameter{name} of shape {tuple(p.shape)}: it is not "
                    "a parameter of model (every parameter optimized must belong "
                    "to the model passed as model=)"
                )
        super().add_param_group({**param_group, "params": params})
        # The graph spans every group: rebuild it (keeping state) at the next step.
        self._graph = None

    def _all_params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def structure_graph(self, params: list[torch.Tensor]) -> NeuralGraph:
        """The neural graph of ``params`` (every group's, groups in order),
        its structure inferred in :func:`structure_order` (on the CPU).
        Shared with the ``higher`` counterpart."""
        names = None
        if all("param_names" in group for group in self.param_groups):
            names = [n for group in self.param_groups for n in group["param_names"]]
        if self._traced_model is not None:
            try:
                return NeuralGraph.from_module(self._traced_model, params)
            except Unsupported as err:
                _warn_untraceable(self._traced_model, err)
                self._traced_model = None
        order = structure_order(params, self._model_order, names)
        if order is None and not self._warned_order:
            self._warned_order = _warn_split_groups(self.param_groups)
        return NeuralGraph.from_shapes([p.shape for p in params], order)

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
        graph = self.structure_graph(params).to(device)
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
        if self.rule.step_size.enabled:
            flat = self._adaptation_state(graph, flat, source, params)
        self._graph, self._flat = graph, flat
        self._layout = tuple(id(p) for p in params)
        # Checked once per layout, so the step pays nothing for these cases
        # when they do not occur.
        self._sharded = any(is_dtensor(p) for p in params)
        self._float64 = [i for i, p in enumerate(params) if p.dtype == torch.float64]
        self.rule.to(device)
        self._plan = self._fused_plan(graph, torch.device(device))
        self._ortho = group_ortho_plan(self.param_groups, graph, self.orthogonal)

    def _adaptation_state(
        self,
        graph: NeuralGraph,
        flat: FeatureState,
        source: dict[torch.Tensor, dict],
        params: list[torch.Tensor],
    ) -> FeatureState:
        """``flat`` with the step-size adaptation's buffers (see
        :func:`lopt.optim.step_size.adapt_step_sizes`), filled from ``source``;
        a parameter without saved ones starts afresh: its trace at its
        current value, its log step (and statistics) at zero. Adds
        per-parameter views ``trace``, ``log_step`` (and ``adapt_stats``) to
        :attr:`state`."""
        values = full_tensors(params) if any(is_dtensor(p) for p in params) else params
        device = flat.step.device
        trace = graph.flatten([v.detach() for v in values]).to(device)
        log_step = torch.zeros(len(params), device=device)
        rows = self.rule.step_size.stats_rows
        stats = initial_adapt_stats(self.rule.step_size, len(params), log_step)
        position = graph.tensor_position.tolist()
        for p, t, pos in zip(params, graph.unflatten(trace), position):
            saved = source.get(p, {})
            if "trace" in saved and "log_step" in saved:
                t.copy_(saved["trace"].reshape(t.shape))
                log_step[pos] = float(saved["log_step"])
                saved_stats = saved.get("adapt_stats")
                if rows and saved_stats is not None and saved_stats.numel() == rows:
                    stats[:, pos] = saved_stats.reshape(rows)
            self.state[p]["trace"] = t
            self.state[p]["log_step"] = log_step[pos]
            if rows:
                self.state[p]["adapt_stats"] = stats[:, pos]
        return flat._replace(trace=trace, log_step=log_step, adapt_stats=stats)

    def _fused_plan(self, graph: NeuralGraph, device: torch.device):
        """The dense plan of ``graph`` when this optimizer fuses its steps,
        else ``None`` (see ``fused``); decided once per layout."""
        if self.fused is False:
            return None
        reason = fused_supported(self.rule, graph, device)
        if reason is None and cpu_kernel.load() is None:
            reason = "the fused CPU kernel could not be built (see the warning)"
        if reason is not None:
            if self.fused:
                raise ValueError(f"NGOptimizer(fused=True) does not apply: {reason}")
            return None
        return DensePlan(graph)

    @staticmethod
    def _views(graph: NeuralGraph, momenta: torch.Tensor, second: torch.Tensor):
        return graph.unflatten(momenta), graph.unflatten(second)

    # ----------------------------------------------------------------- step
    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        """Perform one optimization step.

        Under ``torch.compile`` (``torch.compile(opt.step)``, or a compiled
        training step that calls it) the learned step runs eagerly, behind a
        graph break: it builds its neural graph on first use and skips steps
        on a data-dependent check, which TorchDynamo does not trace reliably,
        so compiling it gives exactly the eager trajectory.

        Args:
            closure (Callable, optional): re-evaluates the model and returns
                the loss.
        """
        if torch.compiler.is_compiling():
            # Imported here: TorchDynamo is loaded by then, and importing it at
            # module level would double the cost of ``import lopt``.
            from torch._dynamo import disable

            return disable(NGOptimizer._step)(self, closure)
        return self._step(closure)

    @torch.no_grad()
    def _step(self, closure: Callable[[], torch.Tensor] | None):
        _check_no_momentum(self.param_groups)
        if not self._warned_lr and not self._lr_checked:
            # At the first step, a group no LR scheduler manages (no
            # initial_lr) with an Adam-like lr: the training script writes
            # absolute values into it. (Later, decays such as
            # ReduceLROnPlateau's may legitimately take a multiplier there.)
            self._lr_checked = True
            for group in self.param_groups:
                if "initial_lr" not in group and _warn_adam_like_lr(
                    group["lr"], "was written into a param group"
                ):
                    self._warned_lr = True
                    break
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
        values = params
        if self._sharded:  # DTensor (FSDP2): the step runs on full tensors
            values, grads = full_tensors(params), full_tensors(grads)
        graph, flat = self._graph, self._flat
        lr, weight_decay = group_values(self.param_groups, graph)
        lr = lr * self._cooldown()
        if self._plan is not None and all(g is not None for g in grads):
            self._fused_step(params, values, grads, lr, weight_decay)
            return loss
        flat_grad, mask = flat_gradients(graph, values, grads)
        if not gradient_is_finite(self, flat_grad):
            return loss
        new_params, new_state = ng_step(
            self.rule,
            graph,
            graph.flatten(values),
            flat_grad,
            flat,
            lr,
            weight_decay,
            mask,
            self._ortho,
        )
        self._write_back(params, values, graph.unflatten(new_params))
        for old, new in zip(flat, new_state):
            old.copy_(new)
        return loss

    def _cooldown(self) -> float:
        """The :func:`cooldown_factor` of the coming step (warns once past
        ``total_steps``)."""
        if self.total_steps is None:
            return 1.0
        done = int(self._flat.step)
        if done >= self.total_steps and not self._warned_past_end:
            self._warned_past_end = True
            warnings.warn(
                f"NGOptimizer: step {done + 1} is past total_steps="
                f"{self.total_steps}; the cooldown has ended and the steps are "
                "zero. Pass the run's real length as total_steps (or None).",
                stacklevel=_user_stacklevel(),
            )
        return cooldown_factor(done, self.total_steps)

    def _ortho_after_fused(self, tensors, before, lr, weight_decay) -> None:
        """Orthogonalise the fused step's changes of the hidden matrices
        (``tensors``: every parameter's stepped value, parameter order;
        ``before``: :func:`~lopt.optim.orthogonal.snapshot` of them)."""
        scale = self.rule.config.step_scale
        log_step = self._flat.log_step if self.rule.step_size.enabled else None

        def decay(group: OrthoGroup) -> torch.Tensor | float:
            # The kernel's p -= lr * exp(s) * step_scale * wd * p, per matrix.
            first = group.index[:, 0]
            lr_g = lr[first] if isinstance(lr, torch.Tensor) else lr
            wd = weight_decay
            wd_g = wd[first] if isinstance(wd, torch.Tensor) else wd
            factor = -scale * lr_g * wd_g
            if log_step is not None:
                factor = factor * torch.exp(log_step[group.positions])
            return factor

        orthogonalize_steps(self._ortho, tensors, before, decay)

    def _fused_step(self, params, values, grads, lr, weight_decay) -> None:
        """The step through the fused CPU kernel (every gradient present).

        Float32 contiguous parameters and gradients are read where they are
        and the parameters updated in place: no flat copies. Anything else
        (other dtypes, strides, DTensors) goes through flat float32 copies
        that the kernel updates, written back as on the reference path.
        """
        graph, order = self._graph, self._graph.tensor_order
        ps = [values[i] for i in order]
        gs = [grads[i] for i in order]
        direct = not self._sharded and all(
            p.dtype == torch.float32
            and g.dtype == torch.float32
            and p.is_contiguous()
            and g.is_contiguous()
            for p, g in zip(ps, gs)
        )
        lib = cpu_kernel.load()
        hidden = self._ortho.indices
        if direct:
            before = snapshot(self._ortho, values) if hidden else []
            stepped = fused_step(
                lib, self._plan, self.rule, ps, gs, self._flat, lr, weight_decay
            )
            if stepped:
                if hidden:
                    self._ortho_after_fused(values, before, lr, weight_decay)
                increment_version(ps)  # in-place writes autograd did not see
            else:
                _skip_nonfinite_step(self)
            return
        flat_params = graph.flatten(values)
        work = graph.unflatten(flat_params)
        work_grads = graph.unflatten(graph.flatten(grads))
        before = snapshot(self._ortho, work) if hidden else []
        stepped = fused_step(
            lib,
            self._plan,
            self.rule,
            [work[i] for i in order],
            [work_grads[i] for i in order],
            self._flat,
            lr,
            weight_decay,
        )
        if stepped:
            if hidden:
                self._ortho_after_fused(work, before, lr, weight_decay)
            self._write_back(params, values, work)
        else:
            _skip_nonfinite_step(self)

    def _write_back(
        self,
        params: list[torch.Tensor],
        values: list[torch.Tensor],
        new: list[torch.Tensor],
    ) -> None:
        """Write the step's float32 results ``new`` into ``params`` in place.

        The step reads float32 copies of ``values`` (the parameters, full
        tensors for DTensors): exact for float32 and 16-bit parameters, so
        their float32 result is written as it is (a parameter without a
        gradient gets its own value back, bit for bit). A float64 parameter
        would lose its low bits, and move even with a zero step, so it gets
        the float32 step added instead. Which parameters are float64 is fixed
        per layout; the loop below runs over those only.
        """
        for i in self._float64:
            new[i] = as_param_dtype(new[i], values[i])
        if self._sharded:
            copy_into(params, new)
        else:
            torch._foreach_copy_(params, new)

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


def _natural(text: str) -> tuple:
    """Sort key of a dotted name with its integers compared as numbers
    (``h.2`` before ``h.10``)."""
    return tuple((0, int(t), "") if t.isdigit() else (1, 0, t) for t in text.split("."))


def _name_key(name: str, ndim: int) -> tuple:
    """Sort key of a named parameter: its module's path (natural order),
    then matrices before vectors, ``weight`` before ``bias`` before the rest
    (a layer's weight, then its bias; a norm's gain, then its shift)."""
    module, _, leaf = name.rpartition(".")
    rank = {"weight": 0, "bias": 1}.get(leaf, 2)
    return (_natural(module) if module else (), ndim < 2, rank, _natural(leaf))


def structure_order(
    params: list[torch.Tensor],
    model_order: dict[int, int] | None = None,
    names: list[str] | None = None,
) -> list[int] | None:
    """The order in which shape inference walks ``params`` (indices into
    ``params``), or ``None`` for the order given.

    With ``model_order`` (each of the model's parameters' position in
    ``model.parameters()``, by ``id``), the model's own order. Otherwise,
    with ``names``, an order that depends on the names only: by module path
    (natural order), matrices first, then ``weight``, ``bias``, the rest.
    Either way, listing or grouping the same parameters differently gives
    the same order of tensors, hence the same graph.
    """
    if model_order is not None:
        keys = [model_order[id(p)] for p in params]
    elif names is not None:
        keys = [_name_key(n, p.dim()) for n, p in zip(names, params)]
    else:
        return None
    return sorted(range(len(params)), key=keys.__getitem__)


def _warn_untraceable(model: nn.Module, err: Unsupported) -> None:
    """Warn that ``graph="traced"`` falls back to shape inference, and why."""
    warnings.warn(
        f"NGOptimizer(graph='traced'): the fx trace of {type(model).__name__} "
        f"is unsupported ({err}), so the neural graph falls back to shape "
        "inference over its parameters in the model's order (graph='shapes').",
        UserWarning,
        stacklevel=_user_stacklevel(),
    )


def _warn_split_groups(param_groups: list[dict[str, Any]]) -> bool:
    """Warn (and return ``True``) when unnamed param groups look like a
    decay / no-decay split: no group mixes matrices and vectors, and some
    group holds only vectors (two or more of them). Their concatenation is
    not the network's order, and the graph inferred from it attaches norms
    and biases to the wrong neurons. (Layer-wise groups hold a layer's
    weight with its bias, so they mix.)"""
    kinds = [{p.dim() >= 2 for p in g["params"]} for g in param_groups if g["params"]]
    vectors = sum(len(g["params"]) for g, k in zip(param_groups, kinds) if k == {False})
    if not (all(len(k) == 1 for k in kinds) and {True} in kinds and vectors >= 2):
        return False
    warnings.warn(
        "NGOptimizer: the param groups split the network's vectors (biases, "
        "norm gains) from its matrices, so their order is not the network's, "
        "and the neural graph inferred from it attaches them to the wrong "
        "neurons. Pass model=model (NGOptimizer(groups, model=model)), or "
        "named parameters, so that the structure comes from the model.",
        UserWarning,
        stacklevel=_user_stacklevel(),
    )
    return True


#: Source files whose frames a warning skips to point at the user's line.
_INTERNAL_FILES = (
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    os.path.dirname(os.path.abspath(torch.__file__)),
)


def _user_stacklevel() -> int:
    """The ``stacklevel`` (for a ``warnings.warn`` in the caller) of the first
    frame outside lopt and torch: the user's line, however deep the call."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL_FILES):
        frame, level = frame.f_back, level + 1
    return level


def group_values(
    param_groups: list[dict[str, Any]], graph: NeuralGraph
) -> tuple[float | torch.Tensor, float | torch.Tensor]:
    """``lr`` and ``weight_decay`` as :func:`~lopt.optim.functional.ng_step`
    takes them: each the groups' common value as a float, or ``(P,)`` with
    one value per scalar in graph order. Values that are tensors requiring
    grad (``higher``'s differentiable hyperparameters) stay tensors, so that
    gradients reach them.

    Shared by :class:`NGOptimizer` and its ``higher`` counterpart.
    """
    sizes = [len(group["params"]) for group in param_groups]
    out = []
    for key in ("lr", "weight_decay"):
        values = [group[key] for group in param_groups]
        tracked = any(isinstance(v, torch.Tensor) and v.requires_grad for v in values)
        if not tracked and len({float(v) for v in values}) == 1:
            out.append(float(values[0]))
        elif len(values) == 1:
            out.append(values[0])
        elif not tracked:
            per_param = [float(v) for v, n in zip(values, sizes) for _ in range(n)]
            out.append(graph.per_scalar(per_param, torch.float32))
        else:
            device = graph.tensor_id.device
            per_param = [
                torch.as_tensor(v, dtype=torch.float32, device=device).reshape(())
                for v, n in zip(values, sizes)
                for _ in range(n)
            ]
            blocks = zip(graph.tensor_order, graph.numels)
            out.append(torch.cat([per_param[i].expand(n) for i, n in blocks]))
    return out[0], out[1]


def group_ortho_plan(
    param_groups: list[dict[str, Any]], graph: NeuralGraph, enabled: bool
) -> OrthoPlan:
    """The hidden matrices whose updates are orthogonalised: the guess of
    :func:`~lopt.optim.orthogonal.hidden_matrices`, with each group's
    ``"orthogonal"`` key deciding for its own tensors; none when not
    ``enabled``. Shared by :class:`NGOptimizer` and its ``higher``
    counterpart."""
    if not enabled:
        return ortho_plan(graph, [])
    marks = [
        group.get(ORTHOGONAL_KEY) for group in param_groups for _ in group["params"]
    ]
    return ortho_plan(graph, hidden_matrices(graph.shapes, marks, graph.tensor_order))


def as_param_dtype(new: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """The float32 result ``new`` of a step from ``value``, in ``value``'s
    dtype. A float64 parameter gets the float32 step added instead, so that
    it keeps its low bits and stays exactly in place where its step is zero
    (differentiably: ``value - value.float()`` has zero gradient).

    Shared by :class:`NGOptimizer` and its ``higher`` counterpart.
    """
    if value.dtype == torch.float64:
        return value + (new - value.float())
    return new.to(value.dtype)


def gradient_is_finite(owner: Any, flat_grad: torch.Tensor) -> bool:
    """Apply ``owner.nonfinite`` to a flat gradient: ``True`` to go on, ``False``
    to skip the step (counted in ``owner.skipped_steps``), or raise.

    Shared by :class:`NGOptimizer` and its ``higher`` counterpart.
    """
    if bool(torch.isfinite(flat_grad.detach()).all()):
        return True
    _skip_nonfinite_step(owner)
    return False


def _skip_nonfinite_step(owner: Any) -> None:
    """A gradient was not finite: raise, or count the skipped step, as
    ``owner.nonfinite`` says."""
    if owner.nonfinite == "raise":
        raise FloatingPointError("NGOptimizer: non-finite gradient")
    owner.skipped_steps += 1


def _check_no_momentum(param_groups: list[dict[str, Any]]) -> None:
    """Refuse a momentum that something (a momentum-cycling LR scheduler) has
    written into a param group: the learned rule has none to set."""
    for group in param_groups:
        if group.get("momentum") is not None:
            raise ValueError(
                f"Invalid momentum: {group['momentum']} (NGOptimizer has no "
                "momentum hyperparameter: its momenta are inputs of the learned "
                "rule). OneCycleLR and CyclicLR cycle momentum by default: pass "
                "cycle_momentum=False to them."
            )


def _check_number(name: str, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"Invalid {name}: {value}")
        value = value.item()
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"Invalid {name}: {value}")
