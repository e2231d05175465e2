"""The outer loop: meta-gradients from truncated unrolls, outer Adam, validation,
best-rule selection, CSV logs and atomic, exactly-resumable checkpoints."""

from __future__ import annotations

import copy
import csv
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch.nn.utils import parameters_to_vector, vector_to_parameters
from tqdm import tqdm

from lopt.graph import NeuralGraph
from lopt.optim.features import FeatureState
from lopt.optim.rule import RuleConfig, UpdateRule, load_rule, save_rule
from lopt.optim.step_size import StepSizeConfig, split_legacy_fields
from lopt.tasks.families import MLPFamily, TaskConfig, _log_uniform, make_task
from meta_train.config import VAL_METRICS, MetaTrainConfig
from meta_train.distributed import all_reduce_mean_, world
from meta_train.estimators import PESSlot, pes_step
from meta_train.evaluate import final_log_ratio, loss_curve
from meta_train.unroll import (
    LOSS_CAP,
    InnerState,
    advance_inner,
    new_inner_state,
    truncated_unroll,
)

__all__ = ["MetaTrainer", "validate", "CHECKPOINT", "BEST_RULE", "LAST_RULE"]

CHECKPOINT = "checkpoint.pt"
BEST_RULE = "best_rule"
LAST_RULE = "last_rule"
LOG = "log.csv"


def _git_commit() -> str:
    """HEAD of the checkout the code runs from, ``+dirty`` with local changes."""
    here = Path(__file__).resolve().parent
    try:
        run = lambda *a: subprocess.run(  # noqa: E731
            ["git", *a], capture_output=True, text=True, check=True, cwd=here
        ).stdout.strip()
        dirty = "+dirty" if run("status", "--porcelain") else ""
        return run("rev-parse", "HEAD") + dirty
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


@torch.no_grad()
def validate(
    rule: UpdateRule | None,
    configs: list[TaskConfig],
    steps: int,
    metric: str = "tail",
) -> float:
    """Validation score of ``rule`` on ``configs`` (lower is better).
    ``rule=None`` runs Adam(lr=1e-3) as a reference on the same tasks and batches.

    Metrics:
        - ``"tail"``: mean over tasks of the mean ``log(L_t / L_0)`` over the
          last half of a ``steps``-step run (each term capped at ``log 10``).
        - ``"final"``: mean over tasks of ``log(L_final / L_0)``, the final loss
          being the mean of the last 10% of steps, and a run that diverges
          (loss above 10x its start) scoring ``log 10``: it rewards the loss
          reached at the end and punishes late blow-ups, which "tail" hardly
          sees.
    """
    if metric not in VAL_METRICS:
        raise ValueError(
            f"Invalid val_metric: {metric!r} (expected one of {VAL_METRICS})"
        )
    scores = []
    for config in configs:
        if metric == "final":
            losses, diverged = loss_curve(rule, config, steps, stop_above=10.0)
            scores.append(final_log_ratio(losses, diverged))
            continue
        losses, _ = loss_curve(rule, config, steps)
        init = losses[0]
        tail = losses[len(losses) // 2 :]
        scores.append(
            sum(min(math.log(max(v, 1e-12) / init), math.log(10.0)) for v in tail)
            / len(tail)
        )
    return sum(scores) / len(scores)


_METRIC_TEXT = {
    "tail": "mean log(L_t/L_0) over the last half of {steps} steps on {tasks} "
    "fixed tasks (lower is better)",
    "final": "mean log(L_final/L_0) (final: last 10% of {steps} steps; diverged "
    "runs score log 10) on {tasks} fixed tasks (lower is better)",
}


def _trainable_names(rule: UpdateRule, prefixes: tuple[str, ...]) -> list[str]:
    """Names of the rule's parameters to meta-train: all, or those starting with
    one of ``prefixes`` (each prefix must match at least one)."""
    names = [n for n, _ in rule.named_parameters()]
    if not prefixes:
        return names
    for prefix in prefixes:
        if not any(n.startswith(prefix) for n in names):
            raise ValueError(
                f"Invalid train_only prefix {prefix!r}: no rule parameter starts "
                f"with it (parameters: {names})"
            )
    return [n for n in names if n.startswith(tuple(prefixes))]


def rule_configs(config: MetaTrainConfig) -> tuple[RuleConfig, StepSizeConfig]:
    """The rule architecture and step-size controller ``config`` asks for:
    its ``rule`` and ``step_size`` overrides of the defaults (``rule`` may
    still name controller settings by their old ``step_adapt_*`` names, as
    run configs written before the controller had its own config do)."""
    fields, legacy = split_legacy_fields(config.rule)
    return RuleConfig(**fields), StepSizeConfig(**{**legacy, **config.step_size})


def transplant(
    source: UpdateRule, config: RuleConfig, step_size: StepSizeConfig | None = None
) -> UpdateRule:
    """A new rule of ``config`` holding ``source``'s parameters wherever a
    name and shape match and the parameter plays the same role (the edge
    head's output layer reads another input when the edge head's width
    differs, and the edge node projections do when ``edge_mlp`` differs);
    the others keep their initialisation. Output biases are constants of the
    update whatever feeds the layer, so they always carry over. Its metadata
    names what was copied and what was not."""
    rule = UpdateRule(config, step_size)
    theirs = source.state_dict()
    ours = rule.state_dict()
    other_role = []
    if source.config.edge_hidden != config.edge_hidden:
        other_role.append("edge_head.out.weight")
    if source.config.edge_mlp != config.edge_mlp:
        other_role += [".edge_src.", ".edge_dst."]
    copied = sorted(
        k
        for k, v in ours.items()
        if k in theirs
        and theirs[k].shape == v.shape
        and not any(part in k for part in other_role)
    )
    rule.load_state_dict({**ours, **{k: theirs[k] for k in copied}})
    rule.metadata = {
        "transplanted_from": dict(source.metadata),
        "transplanted": copied,
        "initialised": sorted(set(ours) - set(copied)),
    }
    return rule


def _family_overrides(overrides: dict) -> dict:
    """JSON lists become tuples (the family's fields are tuples)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}


@dataclass
class _Record:
    iteration: int
    meta_loss: float
    grad_norm: float
    skipped: int
    lr: float
    val_score: float | None
    seconds: float


class MetaTrainer:
    """Meta-trains an :class:`UpdateRule` with truncated backprop through unrolls.

    Args:
        config: outer-loop settings.
        out: output directory (checkpoint, logs, best and last rule).
        command: the command line recorded in the rule's provenance.
    """

    def __init__(
        self, config: MetaTrainConfig, out: str | os.PathLike, command: str = ""
    ):
        self.config = config
        self.out = Path(out)
        self.command = command or " ".join([Path(sys.executable).name, *sys.argv])
        if config.threads:
            torch.set_num_threads(config.threads)
        torch.manual_seed(config.seed)
        rule_config, step_size = rule_configs(config)
        if config.init_rule and config.init_partial:
            self.rule = transplant(load_rule(config.init_rule), rule_config, step_size)
        elif config.init_rule:
            self.rule = load_rule(config.init_rule)
            overridden = config.rule or config.step_size
            if overridden and (rule_config, step_size) != (
                self.rule.config,
                self.rule.step_size,
            ):
                raise ValueError(
                    f"Invalid rule overrides {config.rule} {config.step_size}: "
                    f"init_rule {config.init_rule} has config {self.rule.config} "
                    f"and step size {self.rule.step_size}"
                )
            self.rule.metadata = {"fine_tuned_from": dict(self.rule.metadata)}
        else:
            self.rule = UpdateRule(rule_config, step_size)
        self.family = MLPFamily(**_family_overrides(config.family))
        self.trainable_names = _trainable_names(self.rule, config.train_only)
        named = dict(self.rule.named_parameters())
        for name, param in named.items():
            param.requires_grad_(name in self.trainable_names)
        self.trainable = [named[n] for n in self.trainable_names]
        self.outer = torch.optim.Adam(self.trainable, lr=config.outer_lr)
        self.rank, self.world_size = world()
        # Each worker unrolls its own tasks; the rule's init is the same on all.
        self.generator = torch.Generator().manual_seed(config.seed + 7919 * self.rank)
        val_gen = torch.Generator().manual_seed(config.seed + 10_000)
        val_family = replace(self.family, **_family_overrides(config.val_family))
        self.val_configs = [val_family.sample(val_gen) for _ in range(config.val_tasks)]
        self.iteration = 0
        self.skipped = 0
        self.best_score = math.inf
        self.adam_score: float | None = None
        self.inner: list[InnerState] = []
        # The code that trains is the code at start: record its commit now.
        self.commit = _git_commit()

    # ----------------------------------------------------------- schedule
    def _lr(self, iteration: int) -> float:
        c = self.config
        frac = min(iteration / max(c.iterations, 1), 1.0)
        return c.outer_lr_final + 0.5 * (c.outer_lr - c.outer_lr_final) * (
            1 + math.cos(math.pi * frac)
        )

    # --------------------------------------------------------------- step
    def _new_slot(self) -> InnerState | PESSlot:
        c = self.config
        inner = new_inner_state(self.family, self.generator, c.horizon)
        if c.warm_start[1] > 0:
            steps = round(_log_uniform(*c.warm_start, self.generator))
            warm, diverged = advance_inner(self.rule, inner, steps, self.generator)
            if not diverged:  # else: start this task at step 0
                inner = warm
        if c.estimator == "tbptt":
            return inner
        xi = torch.zeros(sum(p.numel() for p in self.trainable))
        return PESSlot(inner, copy.copy(inner), xi)

    def _tbptt_gradient(self) -> torch.Tensor:
        losses = []
        for i, inner in enumerate(self.inner):
            loss, new_inner, diverged = truncated_unroll(
                self.rule, inner, self.config.truncation, self.generator
            )
            losses.append(loss)
            self.inner[i] = (
                self._new_slot() if diverged or new_inner.done else new_inner
            )
        meta_loss = torch.stack(losses).mean()
        self.outer.zero_grad()
        meta_loss.backward()
        return meta_loss.detach()

    def _pes_gradient(self) -> torch.Tensor:
        c = self.config
        theta = parameters_to_vector(self.trainable).detach()
        work = copy.deepcopy(self.rule).requires_grad_(False)
        work_named = dict(work.named_parameters())
        work_trainable = [work_named[n] for n in self.trainable_names]

        def unroll(th, inner, gen):
            vector_to_parameters(th, work_trainable)
            loss, new_inner, diverged = truncated_unroll(
                work, inner, c.truncation, gen, differentiable=False
            )
            return (float(loss.detach()) if not diverged else LOSS_CAP), new_inner

        grads, losses = [], []
        for i, slot in enumerate(self.inner):
            grad, loss, new_slot = pes_step(
                theta, slot, unroll, c.pes_sigma, self.generator
            )
            grads.append(grad)
            losses.append(loss)
            done = new_slot.pos.done or not (
                torch.isfinite(new_slot.pos.params).all()
                and torch.isfinite(new_slot.neg.params).all()
            )
            self.inner[i] = self._new_slot() if done else new_slot
        self.outer.zero_grad()
        flat_grad = torch.stack(grads).mean(0)
        offset = 0
        for p in self.trainable:
            p.grad = flat_grad[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        return torch.tensor(sum(losses) / len(losses))

    def meta_step(self) -> _Record:
        c = self.config
        start = time.perf_counter()
        while len(self.inner) < c.num_tasks:
            self.inner.append(self._new_slot())
        if c.estimator == "pes":
            meta_loss = self._pes_gradient()
        else:
            meta_loss = self._tbptt_gradient()
        # Data parallel: average meta-gradients (and the logged loss) over workers.
        grads = [p.grad for p in self.trainable if p.grad is not None]
        meta_loss = meta_loss.detach().reshape(1)
        all_reduce_mean_([*grads, meta_loss])
        meta_loss = meta_loss[0]
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.trainable, c.clip_norm))
        lr = self._lr(self.iteration)
        for group in self.outer.param_groups:
            group["lr"] = lr
        if math.isfinite(grad_norm) and torch.isfinite(meta_loss):
            self.outer.step()
        else:
            self.skipped += 1
        self.iteration += 1
        val = None
        if self.iteration % c.val_every == 0 or self.iteration == c.iterations:
            val = self.validate_and_select()
        return _Record(
            self.iteration,
            float(meta_loss),
            grad_norm,
            self.skipped,
            lr,
            val,
            time.perf_counter() - start,
        )

    def validate_and_select(self) -> float | None:
        """Validate and keep the best rule (worker 0 only; others return None)."""
        if self.rank != 0:
            return None
        c = self.config
        if self.adam_score is None:
            self.adam_score = validate(
                None, self.val_configs, c.val_steps, c.val_metric
            )
        score = validate(self.rule, self.val_configs, c.val_steps, c.val_metric)
        if score < self.best_score:
            self.best_score = score
            save_rule(self.rule, self.out / BEST_RULE, self._provenance(score))
        return score

    def _provenance(self, score: float) -> dict:
        return {
            "command": self.command,
            "meta_train_config": self.config.to_json(),
            "commit": self.commit,
            "iteration": self.iteration,
            "validation_score": score,
            "validation_score_adam_1e-3": self.adam_score,
            "validation_metric": _METRIC_TEXT[self.config.val_metric].format(
                steps=self.config.val_steps, tasks=self.config.val_tasks
            ),
        }

    # -------------------------------------------------------------- train
    def train(self, progress: bool = True, stop_after: int | None = None) -> UpdateRule:
        """Run until ``config.iterations`` (or until iteration ``stop_after``, as
        if killed there); returns the rule (the best one is on disk)."""
        self.out.mkdir(parents=True, exist_ok=True)
        main = self.rank == 0
        if main:
            self.config.save(self.out / "config.json")
        bar = tqdm(
            total=self.config.iterations,
            initial=self.iteration,
            disable=not progress or not main,
            desc="meta-train",
            dynamic_ncols=True,
        )
        log_name = LOG if main else f"log-rank{self.rank}.csv"
        with open(self.out / log_name, "a", newline="") as log_file:
            log = csv.writer(log_file)
            if log_file.tell() == 0:
                log.writerow(list(_Record.__dataclass_fields__))
            end = self.config.iterations if stop_after is None else stop_after
            if self.iteration == 0 and self.config.init_rule and main:
                # A fine-tune's starting point is a candidate too: logged as
                # iteration 0, and kept as the best rule unless a later one
                # validates better (short-horizon bias can make them worse).
                start = time.perf_counter()
                score = self.validate_and_select()
                record = _Record(
                    0, math.nan, math.nan, 0, math.nan, score,
                    time.perf_counter() - start,
                )  # fmt: skip
                log.writerow([getattr(record, k) for k in _Record.__dataclass_fields__])
                log_file.flush()
            while self.iteration < min(end, self.config.iterations):
                record = self.meta_step()
                log.writerow([getattr(record, k) for k in _Record.__dataclass_fields__])
                log_file.flush()
                postfix = {"meta_loss": f"{record.meta_loss:.3f}"}
                if record.val_score is not None:
                    postfix["val"] = f"{record.val_score:.3f}"
                    postfix["adam"] = f"{self.adam_score:.3f}"
                bar.set_postfix(postfix)
                bar.update(1)
                if (
                    self.iteration % self.config.checkpoint_every == 0
                    or self.iteration == self.config.iterations
                ):
                    self.save_checkpoint()
        bar.close()
        if main and self.iteration >= self.config.iterations:
            save_rule(self.rule, self.out / LAST_RULE, self._provenance(float("nan")))
        return self.rule

    # --------------------------------------------------------- checkpoint
    def _checkpoint_path(self) -> Path:
        """Worker 0 writes ``checkpoint.pt``; worker r also keeps its own inner
        tasks in ``checkpoint-rank{r}.pt`` so a distributed run resumes exactly."""
        if self.rank == 0:
            return self.out / CHECKPOINT
        return self.out / f"checkpoint-rank{self.rank}.pt"

    def save_checkpoint(self) -> Path:
        """Write everything needed to continue exactly, atomically."""
        inner = [
            {"pos": _inner_to_dict(s.pos), "neg": _inner_to_dict(s.neg), "xi": s.xi}
            if isinstance(s, PESSlot)
            else {"state": _inner_to_dict(s)}
            for s in self.inner
        ]
        payload = {
            "meta_train_config": self.config.to_json(),
            "rule": self.rule.state_dict(),
            "outer": self.outer.state_dict(),
            "iteration": self.iteration,
            "skipped": self.skipped,
            "best_score": self.best_score,
            "adam_score": self.adam_score,
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "inner": inner,
        }
        path = self._checkpoint_path()
        tmp = path.with_suffix(".tmp")
        torch.save(payload, tmp)
        os.replace(tmp, path)
        return path

    def load_checkpoint(self) -> None:
        """Restore from ``out/checkpoint.pt`` (tensors and plain data only)."""
        path = self._checkpoint_path()
        if not path.is_file():
            raise FileNotFoundError(f"No checkpoint to resume at {path}")
        payload = torch.load(path, weights_only=True)
        saved = MetaTrainConfig.from_json(payload["meta_train_config"])
        if saved != self.config:
            raise ValueError(
                f"Checkpoint {path} was written with another configuration; resume "
                "with the same --preset and options"
            )
        self.rule.load_state_dict(payload["rule"])
        self.outer.load_state_dict(payload["outer"])
        self.iteration = payload["iteration"]
        self.skipped = payload["skipped"]
        self.best_score = payload["best_score"]
        self.adam_score = payload["adam_score"]
        self.generator.set_state(payload["generator"])
        torch.set_rng_state(payload["torch_rng"])
        self.inner = [
            PESSlot(_inner_from_dict(it["pos"]), _inner_from_dict(it["neg"]), it["xi"])
            if "xi" in it
            else _inner_from_dict(it["state"])
            for it in payload["inner"]
        ]


def _inner_to_dict(inner: InnerState) -> dict:
    return {
        "config": inner.config.to_json(),
        "params": inner.params.detach(),
        "opt_state": list(inner.opt_state),
        "step": inner.step,
        "horizon": inner.horizon,
        "init_loss": inner.init_loss,
    }


def _inner_from_dict(item: dict) -> InnerState:
    config = TaskConfig.from_json(item["config"])
    task = make_task(config)
    model = task.make_model(config.seed)
    graph = NeuralGraph.from_shapes([p.shape for p in model.parameters()])
    return InnerState(
        config,
        task,
        model,
        graph,
        item["params"],
        FeatureState(*item["opt_state"]),
        item["step"],
        item["horizon"],
        item["init_loss"],
    )
