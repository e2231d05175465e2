"""Where a result came from: versions, machine, commit and the rule measured.

Every results file carries this block, so a number quoted in the README can be
traced back to the code and the rule that produced it.
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

import lopt
from lopt import UpdateRule, default_rule_path

__all__ = ["run_metadata"]


def _git_commit() -> str | None:
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def run_metadata(
    rule_path: str | os.PathLike | None = None, rule: UpdateRule | None = None
) -> dict[str, Any]:
    """Versions, machine, commit, time and the learned rule's provenance.

    Args:
        rule_path: the rule directory measured (``None``: the default rule).
        rule: the loaded rule, whose saved provenance is copied.
    """
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"
        ),
        "git_commit": _git_commit(),
        "lopt_version": lopt.__version__,
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "rule_path": str(rule_path) if rule_path is not None else default_rule_path(),
        "rule_provenance": dict(rule.metadata) if rule is not None else None,
        "rule_config": asdict(rule.config) if rule is not None else None,
    }
