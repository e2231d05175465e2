"""Moved: ``python -m benchmarks.import_time`` runs ``benchmarks.optim.import_time``."""

from benchmarks.common.cli import run_moved

run_moved(__name__, "benchmarks.optim.import_time")
