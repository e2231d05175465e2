"""Moved: ``python -m benchmarks.compare`` runs ``benchmarks.optim.compare``."""

from benchmarks.common.cli import run_moved

run_moved(__name__, "benchmarks.optim.compare")
