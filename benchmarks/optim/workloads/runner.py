"""One run of a workload under a recipe, and the cache of finished runs.

A run trains ``workload.total_steps(quick)`` steps, records every step's
train loss, evaluates the held-out split every ``eval_interval`` steps and at
the end (in eval mode, at the weights the recipe says to read), and times
the training steps alone (evaluations excluded), so curves can be read
against steps and against seconds. It stops early when the loss is not
finite or exceeds :data:`DIVERGENCE_FACTOR` times its first value.

Finished runs are cached as one JSON file each (loading never executes
code), named by a hash of everything the run depends on: workload, quick,
recipe, learning rate, seed, steps, Python version (the text workloads read
Python's own documentation), torch version and threads, the peer
package's version, and for the NG recipes the rule's weights checksum and
controller settings and the version of their setup (:data:`NG_SETUP`). A
full benchmark can therefore span sittings: a rerun skips what is done.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmarks.common.report import cache_directory, write_text
from benchmarks.optim.workloads.recipes import Recipe, Trainer
from benchmarks.optim.workloads.spec import Workload
from lopt import default_rule_path

__all__ = ["DIVERGENCE_FACTOR", "RunRecord", "RunCache", "train_run"]

#: A run diverges when its loss exceeds this multiple of its first loss.
DIVERGENCE_FACTOR = 10.0
#: Bumped when what a run records or how it trains changes.
RUNNER_VERSION = 1
_PACKAGES = {"schedulefree": "schedulefree", "prodigy": "prodigyopt"}


@dataclass
class RunRecord:
    """What one run measured.

    Attributes:
        workload, recipe, lr, seed, quick, steps: what ran.
        train_losses: the loss of every completed step.
        eval_steps: steps after which the held-out split was evaluated.
        eval_seconds: training seconds spent up to each evaluation.
        evals: the evaluation dicts (``val_loss`` and the workload's metric).
        diverged_at: the 1-based step that diverged (``None``: it did not).
        seconds: total training seconds (evaluations excluded).
    """

    workload: str
    recipe: str
    lr: float | None
    seed: int
    quick: bool
    steps: int
    train_losses: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval_seconds: list[float] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)
    diverged_at: int | None = None
    seconds: float = 0.0

    def final(self, key: str) -> float:
        """The last evaluation's ``key`` (NaN for a diverged run)."""
        if self.diverged_at is not None or not self.evals:
            return math.nan
        return self.evals[-1][key]


def train_run(
    workload: Workload,
    recipe: Recipe,
    seed: int,
    quick: bool,
    make_trainer: Callable[..., Trainer] = Trainer,
) -> RunRecord:
    """Train one run (see the module docstring). ``make_trainer`` builds the
    run's :class:`Trainer` from ``(recipe, job, workload, total steps)``
    (validation runs pass variants of it)."""
    total = workload.total_steps(quick)
    every = workload.eval_interval(quick)
    job = workload.make(seed, quick)
    trainer = make_trainer(recipe, job, workload, total)
    record = RunRecord(workload.name, recipe.name, recipe.lr, seed, quick, total)
    model = job.model
    first = None
    seconds = 0.0
    for step in range(1, total + 1):
        model.train()
        start = time.perf_counter()
        batch = job.next_batch()
        trainer.zero_grad()
        loss = job.loss(model, batch)
        value = float(loss.detach())
        first = value if first is None else first
        if not math.isfinite(value) or abs(value) > DIVERGENCE_FACTOR * abs(first):
            record.diverged_at = step
            break
        loss.backward()
        trainer.step()
        seconds += time.perf_counter() - start
        record.train_losses.append(value)
        if step % every == 0 or step == total:
            model.eval()
            with torch.no_grad(), trainer.evaluation():
                result = job.evaluate(model)
            record.eval_steps.append(step)
            record.eval_seconds.append(seconds)
            record.evals.append({k: float(v) for k, v in result.items()})
    record.seconds = seconds
    return record


#: Bumped when how the NG recipes set up ``NGOptimizer`` changes (2: told
#: ``total_steps``; orthogonalised hidden matrices).
NG_SETUP = 2


def _rule_checksum() -> str:
    """The shipped rule's weights checksum, and its step-size controller's
    settings where its config has them (format 3)."""
    config = json.loads(Path(default_rule_path(), "config.json").read_text())
    weights = str(config.get("weights_sha256"))
    if "step_size" not in config:
        return weights
    return f"{weights}:{json.dumps(config['step_size'], sort_keys=True)}"


class RunCache:
    """Finished runs as JSON files in ``directory`` (created when missing)."""

    def __init__(self, directory: str | os.PathLike, structure: str = "groups"):
        self.directory = cache_directory(directory)
        self.hits = 0
        #: The NG recipes' graph source (``Trainer``'s ``structure``): part of
        #: their key unless it is the default.
        self.structure = structure

    def key(self, workload: Workload, recipe: Recipe, seed: int, quick: bool) -> dict:
        key: dict[str, Any] = {
            "runner": RUNNER_VERSION,
            "workload": workload.name,
            "quick": quick,
            "steps": workload.total_steps(quick),
            "recipe": recipe.name,
            "lr": recipe.lr,
            "seed": seed,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        }
        if recipe.name in _PACKAGES:
            key["package"] = importlib.metadata.version(_PACKAGES[recipe.name])
        if recipe.name.startswith("ng"):
            key["rule"] = _rule_checksum()
            key["ng_setup"] = NG_SETUP
            if self.structure != "groups":
                key["structure"] = self.structure
        return key

    def _path(self, key: dict) -> Path:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
        return self.directory / f"{key['workload']}-{key['recipe']}-{digest[:16]}.json"

    def get(self, workload, recipe, seed, quick) -> RunRecord | None:
        key = self.key(workload, recipe, seed, quick)
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
            if data.get("key") != key:
                return None
            record = RunRecord(**data["record"])
        except (json.JSONDecodeError, TypeError, KeyError):
            return None  # unreadable: run again, the put replaces it
        self.hits += 1
        return record

    def put(self, workload, recipe, seed, quick, record: RunRecord) -> None:
        key = self.key(workload, recipe, seed, quick)
        path = self._path(key)
        write_text(path, json.dumps({"key": key, "record": asdict(record)}))
