"""``python -m benchmarks.workloads``: the short name of
``python -m benchmarks.optim.workloads``."""

from benchmarks.common.cli import run_moved

run_moved(__name__, "benchmarks.optim.workloads", note=False)
