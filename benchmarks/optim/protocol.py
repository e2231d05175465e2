"""The comparison protocol shared by ``compare`` and ``scaling``.

For each task: the learned optimizer at its defaults, Adam at its default
learning rate, the untuned peers at their recommended defaults (Prodigy,
Schedule-Free AdamW, LDoG; see :data:`benchmarks.optim.optimizers.PEER_SPECS`), and
each tuned baseline at every point of its learning-rate grid, all on the same
seeds (same initial weights, same batches). Tuning picks,
per task and baseline, the learning rate with the fewest divergent seeds and
then the lowest mean final smoothed train loss. Runs are planned first (so a
progress bar knows the total and shared runs such as Adam at 1e-3, which is
also a grid point, run once), then executed, then summarised.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from benchmarks.common.report import format_lr
from benchmarks.optim import curves
from benchmarks.optim.cache import RunCache
from benchmarks.optim.optimizers import (
    DISPLAY_NAMES,
    NG,
    PEERS,
    UNTRAINED,
    OptimizerConfig,
)
from benchmarks.optim.training import DIVERGENCE_FACTOR, RunResult, train
from lopt import UpdateRule
from lopt.tasks.suite import Task

__all__ = [
    "DEFAULT_ADAM_LR",
    "TIE_TOLERANCE",
    "loss_outcome",
    "Protocol",
    "plan_runs",
    "execute",
    "summarise_task",
    "entry_label",
    "reference_keys",
    "reference_name",
    "run_record",
]

#: Adam's default learning rate, the untuned reference.
DEFAULT_ADAM_LR = 1e-3
#: Final losses within this relative difference count as a tie.
TIE_TOLERANCE = 0.01


@dataclass(frozen=True)
class Protocol:
    """What to run on every task.

    Attributes:
        steps: optimizer steps per run.
        seeds: run seeds.
        grids: learning-rate grid of each tuned baseline.
        peers: untuned peers (names from :data:`benchmarks.optim.optimizers.PEERS`).
        default_adam_lr: the untuned Adam reference.
        smoothing: fraction of steps averaged for the final loss.
        divergence_factor: see :func:`benchmarks.optim.training.train`.
        ablation: also run NG's untrained ablation (entry ``"untrained"``).
    """

    steps: int
    seeds: tuple[int, ...]
    grids: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    peers: tuple[str, ...] = ()
    default_adam_lr: float = DEFAULT_ADAM_LR
    smoothing: float = curves.SMOOTHING_FRACTION
    divergence_factor: float = DIVERGENCE_FACTOR
    ablation: bool = False

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"Invalid steps: {self.steps}")
        if not self.seeds:
            raise ValueError(f"Invalid seeds: {self.seeds}")
        unknown = [p for p in self.peers if p not in PEERS]
        if unknown:
            raise ValueError(f"Invalid peers: {unknown} (known: {list(PEERS)})")

    @property
    def window(self) -> int:
        """Smoothing window in steps."""
        return curves.smoothing_window(self.steps, self.smoothing)

    def configs(self) -> list[OptimizerConfig]:
        """Every optimizer configuration run on each task, without repeats."""
        out = [OptimizerConfig(NG), OptimizerConfig("adam", self.default_adam_lr)]
        if self.ablation:
            out.append(OptimizerConfig(UNTRAINED))
        out += [OptimizerConfig(peer) for peer in self.peers]
        for name, grid in self.grids.items():
            out += [OptimizerConfig(name, lr) for lr in grid]
        return list(dict.fromkeys(out))


def plan_runs(
    tasks: Sequence[Task], protocol: Protocol
) -> list[tuple[Task, OptimizerConfig, int]]:
    """Every ``(task, optimizer, seed)`` to run, in execution order."""
    return [
        (task, config, seed)
        for task in tasks
        for seed in protocol.seeds
        for config in protocol.configs()
    ]


def execute(
    tasks: Sequence[Task],
    protocol: Protocol,
    *,
    rule: UpdateRule | None = None,
    progress: bool = True,
    on_run: Callable[[RunResult], None] | None = None,
    cache: RunCache | None = None,
) -> dict[str, list[RunResult]]:
    """Run the whole plan, with a progress bar over runs.

    A run that raises is recorded with its ``error`` (and reported on the
    console) instead of ending the whole benchmark.

    Args:
        tasks: the tasks.
        protocol: what to run.
        rule: the learned rule shared by every ``NGOptimizer`` run.
        progress: show a tqdm bar.
        on_run: called after each run (e.g. to log).
        cache: re-use finished baseline and peer runs from, and store new ones in,
            this :class:`~benchmarks.optim.cache.RunCache`.

    Returns:
        Runs grouped by task name.
    """
    plan = plan_runs(tasks, protocol)
    results: dict[str, list[RunResult]] = {t.name: [] for t in tasks}
    bar = tqdm(plan, desc="runs", unit="run", disable=not progress, dynamic_ncols=True)
    for task, config, seed in bar:
        bar.set_postfix_str(f"{task.name} {config.label} seed {seed}", refresh=False)
        cached = (
            cache.get(
                task.name, config, seed, protocol.steps, protocol.divergence_factor
            )
            if cache is not None
            else None
        )
        if cached is not None:
            results[task.name].append(cached)
            if on_run is not None:
                on_run(cached)
            continue
        try:
            result = train(
                task,
                config,
                protocol.steps,
                seed,
                rule=rule,
                divergence_factor=protocol.divergence_factor,
            )
        except Exception as err:  # one failed run must not end the suite
            result = RunResult(task.name, config, seed, protocol.steps)
            result.error = f"{type(err).__name__}: {err}"
            result.held_out = {"metric": math.nan, "loss": math.nan}
            bar.write(
                f"run failed: {task.name} {config.label} seed {seed}: {result.error}"
            )
        if cache is not None:
            cache.put(result, protocol.divergence_factor)
        results[task.name].append(result)
        if on_run is not None:
            on_run(result)
    return results


def entry_label(key: str, lr: float | None = None) -> str:
    """Column heading of a summary entry (``"adam_tuned"`` -> ``"Adam*"``,
    ``"adam_default"`` -> ``"Adam(1e-3)"``, ``"prodigy"`` -> ``"Prodigy"``)."""
    name, _, kind = key.partition("_")
    display = DISPLAY_NAMES[name]
    if not kind:  # NG, its ablation and the peers: untuned, at their defaults
        return display
    if kind == "default":
        return f"{display}({format_lr(lr)})" if lr is not None else display
    return f"{display}*"


def reference_name(key: str, lr: float | None = None) -> str:
    """How summary lines name an entry NG is compared against: ``"tuned Adam"``
    for ``"adam_tuned"``, otherwise :func:`entry_label`."""
    name, _, kind = key.partition("_")
    return f"tuned {DISPLAY_NAMES[name]}" if kind == "tuned" else entry_label(key, lr)


def reference_keys(entries: Mapping[str, dict]) -> list[str]:
    """The entries NG is compared against, in report order: Adam(1e-3), tuned
    Adam, the peers present, then NG's untrained ablation."""
    keys = ("adam_default", "adam_tuned", *PEERS, UNTRAINED)
    return [k for k in keys if k in entries]


def _config_of(entry: dict) -> OptimizerConfig:
    return OptimizerConfig(entry["optimizer"], entry["lr"])


def _runs_of(runs: Sequence[RunResult], config: OptimizerConfig) -> list[RunResult]:
    return [r for r in runs if r.optimizer == config]


def _summary(runs: Sequence[RunResult], window: int) -> dict:
    """Seed statistics of one optimizer configuration on one task."""
    finals = [curves.final_loss(r.losses, window) for r in runs if r.completed]
    metric = [r.held_out["metric"] for r in runs]
    held_loss = [r.held_out["loss"] for r in runs]
    loss_mean, loss_std = curves.mean_std(finals)
    metric_mean, metric_std = curves.mean_std(metric)
    return {
        "optimizer": runs[0].optimizer.name,
        "lr": runs[0].optimizer.lr,
        "runs": len(runs),
        "divergences": sum(r.diverged for r in runs),
        "failures": sum(r.error is not None for r in runs),
        "final_loss_mean": loss_mean,
        "final_loss_std": loss_std,
        "metric_mean": metric_mean,
        "metric_std": metric_std,
        "held_out_loss_mean": curves.mean_std(held_loss)[0],
        "wall_s_mean": float(np.mean([r.wall_s for r in runs])),
        "ms_per_step_mean": float(np.mean([r.ms_per_step for r in runs])),
    }


def loss_outcome(ng: dict, baseline: dict, tolerance: float = TIE_TOLERANCE) -> str:
    """``"win"``, ``"tie"`` or ``"loss"`` of NG against a baseline entry.

    NG wins when its mean final loss is lower by more than ``tolerance``
    (relative), loses when higher by more than that, and ties otherwise. A
    side whose every seed diverged has no finite loss and loses to the other.
    """
    ng_loss, base_loss = ng["final_loss_mean"], baseline["final_loss_mean"]
    if not math.isfinite(ng_loss):
        return "tie" if not math.isfinite(base_loss) else "loss"
    if not math.isfinite(base_loss) or ng_loss < base_loss * (1 - tolerance):
        return "win"
    return "loss" if ng_loss > base_loss * (1 + tolerance) else "tie"


def _tuning_key(summary: dict) -> tuple[int, float]:
    loss = summary["final_loss_mean"]
    incomplete = summary["divergences"] + summary["failures"]
    return incomplete, loss if math.isfinite(loss) else math.inf


def _smoothed_mean(runs: Sequence[RunResult], window: int) -> np.ndarray | None:
    curve = curves.mean_curve([r.losses for r in runs if r.completed])
    return None if curve is None else curves.smooth(curve, window)


def _speedup(
    ng: np.ndarray | None, baseline: np.ndarray | None, steps: int
) -> dict | None:
    if ng is None:
        return None
    if baseline is None:
        baseline = np.array([])
    return curves.speedup(ng, baseline, steps).as_dict()


def summarise_task(task: Task, runs: Sequence[RunResult], protocol: Protocol) -> dict:
    """Tune the baselines and summarise one task.

    Returns:
        A dict with ``tuning`` (every grid point's score), ``best_lr``,
        ``entries`` (seed statistics of ``ng``, ``adam_default``, each peer
        and each ``<baseline>_tuned``), ``speedup`` over ``adam_tuned``,
        ``adam_default`` and each peer (see :func:`benchmarks.optim.curves.speedup`),
        the divergence counts and the ``outcome`` (win / tie / loss, see
        :func:`loss_outcome`) of NG against each of :func:`reference_keys`.
    """
    window = protocol.window
    entries = {
        NG: _summary(_runs_of(runs, OptimizerConfig(NG)), window),
        "adam_default": _summary(
            _runs_of(runs, OptimizerConfig("adam", protocol.default_adam_lr)), window
        ),
    }
    for peer in protocol.peers:
        entries[peer] = _summary(_runs_of(runs, OptimizerConfig(peer)), window)
    if protocol.ablation:
        entries[UNTRAINED] = _summary(
            _runs_of(runs, OptimizerConfig(UNTRAINED)), window
        )
    tuning: dict[str, list[dict]] = {}
    best_lr: dict[str, float] = {}
    for name, grid in protocol.grids.items():
        scored = [
            _summary(_runs_of(runs, OptimizerConfig(name, lr)), window) for lr in grid
        ]
        tuning[name] = [
            {
                "lr": s["lr"],
                "final_loss_mean": s["final_loss_mean"],
                "divergences": s["divergences"],
            }
            for s in scored
        ]
        best = min(scored, key=_tuning_key)
        best_lr[name] = best["lr"]
        # A best lr on the grid's edge means the grid may not contain the optimum.
        best["lr_at_grid_edge"] = len(grid) > 1 and best["lr"] in (min(grid), max(grid))
        entries[f"{name}_tuned"] = best

    ng_curve = _smoothed_mean(_runs_of(runs, OptimizerConfig(NG)), window)
    speedups = {}
    for key in reference_keys(entries):
        base_curve = _smoothed_mean(_runs_of(runs, _config_of(entries[key])), window)
        speedups[key] = _speedup(ng_curve, base_curve, protocol.steps)

    outcome = {
        key: loss_outcome(entries[NG], entries[key]) for key in reference_keys(entries)
    }
    return {
        "name": task.name,
        "description": task.description,
        "metric": {
            "name": task.metric.name,
            "higher_is_better": task.metric.higher_is_better,
        },
        "num_params": task.num_params(),
        "entries": entries,
        "tuning": tuning,
        "best_lr": best_lr,
        "speedup": speedups,
        "divergences": {
            "ng": entries[NG]["divergences"],
            "all_runs": sum(r.diverged for r in runs),
        },
        "failures": [
            f"{r.optimizer.label} seed {r.seed}: {r.error}" for r in runs if r.error
        ],
        "outcome": outcome,
    }


def run_record(result: RunResult, points: int = 200) -> dict:
    """JSON-ready record of one run, its curve compressed to ``points`` bins."""
    steps, values = curves.subsample(result.losses, points)
    return {
        "optimizer": result.optimizer.name,
        "lr": result.optimizer.lr,
        "seed": result.seed,
        "steps": result.steps,
        "completed_steps": len(result.losses),
        "diverged": result.diverged,
        "diverged_at": result.diverged_at,
        "error": result.error,
        "initial_loss": result.losses[0] if result.losses else math.nan,
        "held_out": result.held_out,
        "wall_s": result.wall_s,
        "ms_per_step": result.ms_per_step,
        "curve": {"step": steps, "loss": values},
    }
