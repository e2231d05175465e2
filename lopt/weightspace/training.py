"""Fitting weight-space models: one harness for the neural-graph models and
every baseline, so that all of them see the same splits, views and budget.

A split is a :class:`WeightSpaceData`: the networks as neural graphs, their
state_dicts and architectures, and what the task needs (labels; for editing,
the target outputs on an input grid). A *predictor* is an ``nn.Module`` with

* ``collate(data, index) -> batch``: the inputs it reads for the networks
  ``index`` of ``data`` (graphs, flattened weights, statistics, probe
  outputs...),
* ``forward(batch)``: ``(B, out)`` for graph-level tasks, or, for editing, a
  dict of per-parameter deltas stacked over the batch (``{name: (B, *shape)}``),
* optionally ``prepare(train)``, called once before training (input
  normalisation fitted on the training split only).

:class:`NeuralGraphGNN` and :class:`NeuralGraphTransformer` are wrapped in a
:class:`GraphPredictor` automatically. Tasks:

* ``"classification"``: cross-entropy; metric accuracy.
* ``"regression"``: MSE on standardised labels; metrics Kendall's tau (the
  generalization-prediction metric of the paper) and MSE in label units.
* ``"editing"``: the edited network (state_dict + predicted delta) is run on
  ``data.grid`` and compared with ``data.target`` (the paper's INR dilation
  task); metric MSE.

Model selection: after every epoch the validation metric is computed and the
best epoch's weights are kept; training stops after ``patience`` epochs
without improvement.

Example::

    train = WeightSpaceData.from_modules(nets[:80], labels=accs[:80])
    val = WeightSpaceData.from_modules(nets[80:], labels=accs[80:],
                                       kernel_size=train.kernel_size)
    trainer = WeightSpaceTrainer(NeuralGraphGNN(train.edge_features),
                                 task="regression", epochs=30)
    trainer.fit(train, val)
    trainer.predict(val)  # (20,) predicted accuracies
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap
from torch_geometric.data import Batch
from tqdm.auto import tqdm

from lopt.weightspace.graph.data import from_graph_outputs
from lopt.weightspace.models.gnn import NeuralGraphGNN
from lopt.weightspace.models.transformer import NeuralGraphTransformer
from lopt.weightspace.splits import WeightSpaceData, float_state, stack_deltas

__all__ = [
    "TASKS",
    "WeightSpaceData",
    "GraphPredictor",
    "FitResult",
    "WeightSpaceTrainer",
    "kendall_tau",
    "float_state",
]

TASKS = ("classification", "regression", "editing")


class GraphPredictor(nn.Module):
    """A neural-graph model (:class:`~lopt.weightspace.NeuralGraphGNN`,
    :class:`~lopt.weightspace.NeuralGraphTransformer`) as a predictor.

    Graph-level tasks read ``output.graph``; editing maps the node and edge
    outputs back to one delta per parameter
    (:func:`~lopt.weightspace.from_graph_outputs`). With probes in the model's
    config, each batch's architectures are passed to it.

    Args:
        model: the graph model.
        task: one of :data:`TASKS` (set by :class:`WeightSpaceTrainer`).
        normalize: divide node and edge features by their training-split
            standard deviation per layer depth (see :meth:`prepare`).
            (default: ``True``)
    """

    def __init__(
        self, model: nn.Module, task: str = "classification", normalize: bool = True
    ):
        super().__init__()
        self.model, self.task, self.normalize = model, task, normalize

    def prepare(self, train: WeightSpaceData) -> None:
        """Check that the model's positional tables hold every network of
        ``train`` (``ValueError`` naming ``max_positions`` otherwise) and fit
        its input scales on ``train``
        (:meth:`~lopt.weightspace.NeuralGraphFeaturizer.fit_input_scales`)."""
        self.model.features.check_positions(train.graphs)
        if self.normalize:
            batch = Batch.from_data_list(train.graphs[: min(len(train), 2048)])
            self.model.features.fit_input_scales(batch)

    def collate(self, data: WeightSpaceData, index: Sequence[int]):
        batch = Batch.from_data_list([data.graphs[i] for i in index])
        probes = getattr(getattr(self.model, "config", None), "probes", 0)
        networks = [data.modules[i] for i in index] if probes else None
        return batch, networks

    def forward(self, inputs):
        batch, networks = inputs
        out = self.model(batch, networks)
        if self.task != "editing":
            return out.graph
        return stack_deltas(from_graph_outputs(batch, out.node, out.edge))

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.model!r}, task={self.task!r})"


def as_predictor(model: nn.Module) -> nn.Module:
    """``model`` if it is a predictor, a :class:`GraphPredictor` of it if it
    is a neural-graph model."""
    if hasattr(model, "collate"):
        return model
    if isinstance(model, (NeuralGraphGNN, NeuralGraphTransformer)):
        return GraphPredictor(model)
    raise TypeError(
        f"{type(model).__name__} is not a predictor: it needs collate(data, index) "
        "and forward(batch) (see lopt.weightspace.training), or must be a "
        "NeuralGraphGNN / NeuralGraphTransformer"
    )


def kendall_tau(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Kendall's tau-b of two 1-D tensors (ties handled as scipy does)."""
    from scipy.stats import kendalltau

    if len(pred) < 2:
        return float("nan")
    tau = kendalltau(pred.detach().double().numpy(), target.double().numpy())
    return float(tau.statistic if hasattr(tau, "statistic") else tau[0])


@dataclass
class FitResult:
    """What :meth:`WeightSpaceTrainer.fit` returns.

    Attributes:
        best_epoch: the epoch whose weights were kept (1-based; 0: none ran).
        best_val: its validation metric (``metric`` of the task).
        metric: the selection metric's name (accuracy, tau or mse).
        history: per epoch ``{"epoch", "train_loss", "lr", "val": {...}}``.
        train_seconds: wall time of the whole fit.
        stopped: why training ended (``"epochs"``, ``"patience"``,
            ``"time"``, ``"fit"`` for a model fitted in one call).
    """

    best_epoch: int
    best_val: float
    metric: str
    history: list[dict[str, Any]]
    train_seconds: float
    stopped: str


_SELECT = {
    "classification": ("accuracy", 1),
    "regression": ("tau", 1),
    "editing": ("mse", -1),
}


class WeightSpaceTrainer:
    """Train a weight-space predictor on one task, select on validation,
    predict.

    The defaults are the training recipe of the best model of the
    weight-space benchmark (preset ``"ng-gnn-best"``,
    :mod:`lopt.weightspace.presets`), but for its 700 s cap per fit, a
    budget of that benchmark's CPU rather than part of the recipe.

    Args:
        model: a predictor (see the module docs) or a neural-graph model.
        task: ``"classification"``, ``"regression"`` or ``"editing"``.
        lr: AdamW learning rate. (default: ``1e-3``)
        weight_decay: AdamW weight decay. (default: ``1e-4``)
        epochs: maximum passes over the training split. (default: ``60``)
        batch_size: networks per step. (default: ``32``)
        patience: stop after this many epochs without a better validation
            metric; ``None`` never stops early. (default: ``20``)
        max_seconds: stop after the epoch that passes this wall time;
            ``None`` for no limit. (default: ``None``)
        lr_patience: halve the learning rate after every ``lr_patience``
            epochs in a row without a better validation metric (a
            reduce-on-plateau schedule; it needs ``val``); ``None``: a
            constant learning rate. Keep it below ``patience`` or it never
            acts. (default: ``None``)
        grad_clip: clip the gradient's global norm to this before each
            step (:func:`torch.nn.utils.clip_grad_norm_`); ``None``: never.
            One batch of outliers (a diverged network in a zoo) otherwise
            can throw a fit far off in one step. (default: ``1.0``)
        seed: seeds the model's initialisation (the model, or the graph
            model a :class:`GraphPredictor` wraps, is re-initialised with its
            ``reset_parameters`` under this seed), the batch order and any
            augmentation. (default: ``0``)
        edit_scale: editing only: the model's deltas are multiplied by this
            before they are added, so that an untrained model starts near the
            identity edit. (default: ``0.01``)
        progress: tqdm bar over epochs. (default: ``False``)
        desc: the bar's label.

    Raises:
        ValueError: an unknown task or invalid hyperparameter.
        TypeError: a model that is not a predictor.
    """

    def __init__(
        self,
        model: nn.Module,
        task: str = "classification",
        *,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        epochs: int = 60,
        batch_size: int = 32,
        patience: int | None = 20,
        max_seconds: float | None = None,
        lr_patience: int | None = None,
        grad_clip: float | None = 1.0,
        seed: int = 0,
        edit_scale: float = 0.01,
        progress: bool = False,
        desc: str | None = None,
    ):
        if task not in TASKS:
            raise ValueError(f"Invalid task: {task!r} (expected one of {TASKS})")
        if not lr > 0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if weight_decay < 0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if epochs < 1:
            raise ValueError(f"Invalid epochs: {epochs}")
        if batch_size < 1:
            raise ValueError(f"Invalid batch_size: {batch_size}")
        if patience is not None and patience < 1:
            raise ValueError(f"Invalid patience: {patience}")
        if lr_patience is not None and lr_patience < 1:
            raise ValueError(f"Invalid lr_patience: {lr_patience}")
        if grad_clip is not None and not grad_clip > 0:
            raise ValueError(f"Invalid grad_clip: {grad_clip}")
        self.lr_patience, self.grad_clip = lr_patience, grad_clip
        self.model = as_predictor(model)
        if hasattr(self.model, "task"):
            self.model.task = task
        self.task, self.lr, self.weight_decay = task, lr, weight_decay
        self.epochs, self.batch_size, self.patience = epochs, batch_size, patience
        if not edit_scale > 0:
            raise ValueError(f"Invalid edit_scale: {edit_scale}")
        self.max_seconds, self.seed, self.progress = max_seconds, seed, progress
        self.edit_scale = edit_scale
        self.desc = desc or type(self.model).__name__
        self.y_mean, self.y_std = 0.0, 1.0
        self.fitted = False

    # ----------------------------------------------------------------- checks
    def _check(self, data: WeightSpaceData, name: str) -> None:
        if not isinstance(data, WeightSpaceData):
            raise TypeError(
                f"{name} must be a WeightSpaceData, got {type(data).__name__}"
            )
        if self.task == "editing":
            if data.target is None:
                raise ValueError(f"{name}: editing needs data.target and data.grid")
        elif data.y is None:
            raise ValueError(f"{name}: the {self.task} task needs labels (data.y)")
        elif self.task == "classification" and data.y.is_floating_point():
            raise ValueError(
                f"{name}: classification needs integer class labels, got "
                f"{data.y.dtype}; use task='regression' for real-valued labels"
            )

    def _check_selected(
        self,
        history: list[dict[str, Any]],
        best_epoch: int,
        metric: str,
        val: WeightSpaceData | None,
    ) -> None:
        """Fail loudly unless the kept weights are usable: raise
        ``RuntimeError`` when the selected epoch's training loss is not
        finite (its weights are not either) or when the model's validation
        predictions are not finite (naming those networks); warn when they
        are finite but the metric is undefined (constant predictions give no
        Kendall's tau)."""
        chosen = history[best_epoch - 1]
        loss = chosen["train_loss"]
        if loss is not None and not math.isfinite(loss):
            diverged = next(
                h["epoch"] for h in history if not math.isfinite(h["train_loss"])
            )
            raise RuntimeError(
                f"fit found no epoch with a finite training loss in "
                f"{len(history)} epochs (it was non-finite from epoch "
                f"{diverged}): nothing to keep; try a lower lr or grad_clip, "
                "and check the data for extreme weights"
            )
        if val is None or math.isfinite(chosen["val"][metric]):
            return
        out = self.predict_raw(val)
        out = (
            torch.cat([v.flatten(1) for v in out.values()], 1)
            if isinstance(out, dict)
            else out.reshape(len(val), -1)
        )
        bad = (~torch.isfinite(out)).any(1).nonzero().flatten().tolist()
        if bad:
            raise RuntimeError(
                f"fit found no epoch with a finite validation {metric}: the "
                f"predictions for validation networks {bad[:10]}"
                f"{'...' if len(bad) > 10 else ''} are not finite (weights too "
                "extreme for the model? load the data with from_modules, which "
                "checks them)"
            )
        warnings.warn(
            f"fit found no epoch with a finite validation {metric}: the "
            "predictions were constant on every validation network, so no "
            f"{metric} is defined; best_val is NaN and the first epoch is kept",
            RuntimeWarning,
            stacklevel=3,
        )

    # ------------------------------------------------------------------ steps
    def _outputs(self, data: WeightSpaceData, index: Sequence[int]):
        out = self.model(self.model.collate(data, index))
        if self.task == "editing":
            return {k: v * self.edit_scale for k, v in out.items()}
        return out

    def _edited(self, data: WeightSpaceData, index: Sequence[int], delta):
        base = data.stacked_state(index)
        module = data.modules[index[0]]
        params = {k: base[k] + delta[k].to(base[k].dtype) for k in base}
        grid = data.grid

        def run(p):
            return functional_call(module, p, (grid,)).reshape(-1)

        return vmap(run)(params)

    def _loss(self, data: WeightSpaceData, index: Sequence[int]) -> torch.Tensor:
        out = self._outputs(data, index)
        rows = torch.as_tensor(list(index), dtype=torch.long)
        if self.task == "classification":
            if out.shape[1] <= int(data.y[rows].max()):
                raise ValueError(
                    f"the model has {out.shape[1]} outputs but a label is "
                    f"{int(data.y[rows].max())}; give it graph_out >= classes"
                )
            return F.cross_entropy(out, data.y[rows])
        if self.task == "regression":
            y = (data.y[rows].float() - self.y_mean) / self.y_std
            return F.mse_loss(out.reshape(len(rows), -1)[:, 0], y)
        return F.mse_loss(self._edited(data, index, out), data.target[rows])

    def _batches(self, n: int, generator: torch.Generator | None):
        order = torch.randperm(n, generator=generator) if generator else torch.arange(n)
        for start in range(0, n, self.batch_size):
            yield order[start : start + self.batch_size].tolist()

    # ------------------------------------------------------------------- API
    def fit(
        self, train: WeightSpaceData, val: WeightSpaceData | None = None
    ) -> FitResult:
        """Train on ``train``; keep the weights of the best epoch on ``val``
        (the last epoch without ``val``).

        Raises:
            ValueError: data without what the task needs (labels, editing
                targets), or class labels beyond the model's outputs.
            RuntimeError: the kept epoch's training loss is not finite (no
                epoch had a finite one), or the model's validation
                predictions are not finite; the message names what and what
                to try. (Finite but constant predictions, which leave
                Kendall's tau undefined, warn and give ``best_val`` NaN.)
        """
        self._check(train, "train")
        if val is not None:
            self._check(val, "val")
        t0 = time.perf_counter()
        torch.manual_seed(self.seed)
        model = self.model
        inner = (
            getattr(model, "model", model)
            if isinstance(model, GraphPredictor)
            else model
        )
        if hasattr(inner, "reset_parameters"):
            inner.reset_parameters()
        if self.task == "regression":
            y = train.y.float()
            self.y_mean = float(y.mean())
            self.y_std = float(y.std()) if len(y) > 1 and float(y.std()) > 0 else 1.0
        if hasattr(model, "prepare"):
            model.prepare(train)
        if hasattr(model, "fit_direct"):
            # Models fitted in one call (gradient-boosted trees): no epochs.
            model.fit_direct(train, self.task, seed=self.seed)
            self.fitted = True
            val_metrics = self.evaluate(val) if val is not None else {}
            metric, _ = _SELECT[self.task]
            history = [{"epoch": 1, "train_loss": None, "val": val_metrics}]
            self._check_selected(history, 1, metric, val)
            return FitResult(
                1,
                val_metrics.get(metric, float("nan")),
                metric,
                history,
                time.perf_counter() - t0,
                "fit",
            )
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"{type(model).__name__} has no trainable parameters")
        optimizer = torch.optim.AdamW(
            params, lr=self.lr, weight_decay=self.weight_decay
        )
        generator = torch.Generator().manual_seed(self.seed)
        if hasattr(model, "generator"):
            model.generator = torch.Generator().manual_seed(self.seed + 1)
        metric, sign = _SELECT[self.task]
        best, best_epoch, best_state, stale = -math.inf, 0, None, 0
        history, stopped = [], "epochs"
        bar = tqdm(
            range(1, self.epochs + 1),
            desc=self.desc,
            disable=not self.progress,
            leave=False,
        )
        for epoch in bar:
            model.train()
            total, count = 0.0, 0
            for index in self._batches(len(train), generator):
                loss = self._loss(train, index)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if self.grad_clip is not None:
                    nn.utils.clip_grad_norm_(params, self.grad_clip)
                optimizer.step()
                total += float(loss.detach()) * len(index)
                count += len(index)
            self.fitted = True
            # The learning rate this epoch trained with.
            lr_now = optimizer.param_groups[0]["lr"]
            record = {"epoch": epoch, "train_loss": total / count, "lr": lr_now}
            if val is not None:
                record["val"] = self.evaluate(val)
                score = sign * record["val"][metric]
                if math.isnan(score):
                    score = -math.inf
            else:
                score = epoch  # the last epoch
            if not math.isfinite(record["train_loss"]):
                # A non-finite loss leaves non-finite weights: never select them.
                score = -math.inf
            history.append(record)
            if score > best or best_state is None:
                best, best_epoch, stale = score, epoch, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                stale += 1
                if (
                    self.lr_patience
                    and val is not None
                    and stale % self.lr_patience == 0
                ):
                    for group in optimizer.param_groups:
                        group["lr"] *= 0.5
            bar.set_postfix(
                loss=f"{record['train_loss']:.4g}",
                **({metric: f"{record['val'][metric]:.4g}"} if val is not None else {}),
            )
            if self.patience is not None and stale >= self.patience:
                stopped = "patience"
                break
            if (
                self.max_seconds is not None
                and time.perf_counter() - t0 > self.max_seconds
            ):
                stopped = "time"
                break
        bar.close()
        model.load_state_dict(best_state)
        model.eval()
        self._check_selected(history, best_epoch, metric, val)
        best_val = sign * best if val is not None else float("nan")
        if val is not None and not math.isfinite(best_val):
            best_val = float("nan")  # not -inf: no epoch had a score
        return FitResult(
            best_epoch, best_val, metric, history, time.perf_counter() - t0, stopped
        )

    @torch.no_grad()
    def predict_raw(self, data: WeightSpaceData) -> Any:
        """The model's outputs for every network of ``data``: ``(n, out)``
        (regression: in label units), or for editing the stacked deltas."""
        if not self.fitted:
            raise RuntimeError("call fit() before predict()")
        model = self.model
        was_training = model.training
        model.eval()
        outs = []
        for index in self._batches(len(data), None):
            if hasattr(model, "predict_direct"):
                outs.append(model.predict_direct(data, index))
            else:
                outs.append(self._outputs(data, index))
        model.train(was_training)
        if self.task == "editing":
            return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}
        out = torch.cat(outs)
        if self.task == "regression":
            out = out.reshape(len(data), -1)[:, 0] * self.y_std + self.y_mean
        return out

    @torch.no_grad()
    def predict(self, data: WeightSpaceData) -> Any:
        """Predictions for every network of ``data``: class indices ``(n,)``
        (classification), values ``(n,)`` (regression), or the edited
        networks' outputs on ``data.grid``, ``(n, P)`` (editing)."""
        out = self.predict_raw(data)
        if self.task == "classification":
            return out.argmax(dim=1)
        if self.task == "regression":
            return out
        if data.grid is None:
            raise ValueError("editing predictions need data.grid")
        rows = list(range(len(data)))
        edited = []
        for start in range(0, len(rows), 256):
            index = rows[start : start + 256]
            edited.append(
                self._edited(data, index, {k: v[index] for k, v in out.items()})
            )
        return torch.cat(edited)

    @torch.no_grad()
    def evaluate(self, data: WeightSpaceData) -> dict[str, float]:
        """Metrics on ``data``: ``accuracy`` (classification), ``tau`` and
        ``mse`` (regression, label units), ``mse`` (editing)."""
        self._check(data, "data")
        pred = self.predict(data)
        if self.task == "classification":
            return {"accuracy": float((pred == data.y).float().mean())}
        if self.task == "regression":
            y = data.y.float()
            return {"tau": kendall_tau(pred, y), "mse": float(F.mse_loss(pred, y))}
        return {"mse": float(F.mse_loss(pred, data.target))}
