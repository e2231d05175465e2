"""A cache of finished baseline and peer runs, so that comparing a new rule
re-runs only ``NGOptimizer``.

Baseline runs (Adam, AdamW, SGD at a given learning rate) and the untuned
peers' runs (Prodigy, Schedule-Free AdamW, LDoG) do not depend on the
learned rule, and with a fixed seed and thread count they are deterministic. A
full comparison spends most of its time on them (the learning-rate grids), so
evaluating several candidate rules against the same baselines re-uses them:
``python -m benchmarks.optim.compare --cache runs/bench_cache --rule CANDIDATE``.

One JSON file per run (loading never executes code), named by a hash of
everything the run depends on: task, optimizer, learning rate, seed, step
budget, divergence factor, torch version and torch thread count, and for a
peer also its package and version and its settings (so a new release of the
package, or new settings, re-runs it; the baselines' keys are unchanged by
this). The learned optimizer's runs are never cached. A cached run keeps the
wall-clock time it was measured with.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path

import torch

from benchmarks.common.report import cache_directory
from benchmarks.optim.optimizers import (
    NG,
    PEER_SPECS,
    UNTRAINED,
    OptimizerConfig,
    peer_version,
)
from benchmarks.optim.training import RunResult

__all__ = ["RunCache"]

_FORMAT = 1


class RunCache:
    """Finished baseline and peer runs stored as JSON files in ``directory``.

    Args:
        directory: where the files live (created when missing).
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = cache_directory(directory)
        self.hits = 0

    @staticmethod
    def cacheable(config: OptimizerConfig) -> bool:
        """Baselines and peers: the learned optimizer's runs depend on the rule."""
        return config.name not in (NG, UNTRAINED)

    def _key(
        self, task: str, config: OptimizerConfig, seed: int, steps: int, factor: float
    ) -> dict:
        key = {
            "format": _FORMAT,
            "task": task,
            "optimizer": config.name,
            "lr": config.lr,
            "seed": seed,
            "steps": steps,
            "divergence_factor": factor,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        }
        spec = PEER_SPECS.get(config.name)
        if spec is not None:  # only for peers: the baselines' keys stay as they were
            key["package"] = f"{spec.distribution}=={peer_version(config.name)}"
            key["settings"] = spec.settings()
        return key

    def _path(self, key: dict) -> Path:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
        return self.directory / f"{key['task']}-{digest[:20]}.json"

    def get(
        self, task: str, config: OptimizerConfig, seed: int, steps: int, factor: float
    ) -> RunResult | None:
        """The cached run, or ``None`` (also for unreadable or mismatched files)."""
        if not self.cacheable(config):
            return None
        key = self._key(task, config, seed, steps, factor)
        path = self._path(key)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if data.get("key") != key:
            return None
        result = RunResult(task, config, seed, steps)
        result.losses = [float(v) for v in data["losses"]]
        result.diverged = bool(data["diverged"])
        result.diverged_at = data["diverged_at"]
        result.held_out = {k: _nan(v) for k, v in data["held_out"].items()}
        result.wall_s = float(data["wall_s"])
        self.hits += 1
        return result

    def put(self, result: RunResult, factor: float) -> None:
        """Store a finished run (runs that raised are not stored)."""
        if not self.cacheable(result.optimizer) or result.error is not None:
            return
        key = self._key(
            result.task, result.optimizer, result.seed, result.steps, factor
        )
        data = {
            "key": key,
            "losses": result.losses,
            "diverged": result.diverged,
            "diverged_at": result.diverged_at,
            "held_out": {
                k: None if math.isnan(v) else v for k, v in result.held_out.items()
            },
            "wall_s": result.wall_s,
        }
        path = self._path(key)
        # Atomic: a killed benchmark never leaves a half-written file behind.
        fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        os.replace(tmp, path)


def _nan(value) -> float:
    return math.nan if value is None else float(value)
