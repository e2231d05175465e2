"""Moved: ``python -m benchmarks.overhead`` runs ``benchmarks.optim.overhead``."""

from benchmarks.common.cli import run_moved

run_moved(__name__, "benchmarks.optim.overhead")
