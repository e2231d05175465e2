"""Moved: ``python -m benchmarks.summary`` runs ``benchmarks.optim.summary``."""

from benchmarks.common.cli import run_moved

run_moved(__name__, "benchmarks.optim.summary")
