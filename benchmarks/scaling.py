"""Moved: ``python -m benchmarks.scaling`` runs ``benchmarks.optim.scaling``."""

from benchmarks.common.cli import run_moved

run_moved(__name__, "benchmarks.optim.scaling")
