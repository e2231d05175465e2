"""Benchmarks for lopt.

* :mod:`benchmarks.optim`: the learned optimizer against the optimizers people
  run (held-out suite, overhead, scaling, import time);
* :mod:`benchmarks.weightspace`: the weight-space models against their
  baselines on locally built zoos;
* :mod:`benchmarks.common`: what both share (command line, tables, provenance,
  timing).

Results live in ``benchmarks/results/``. The old commands
(``python -m benchmarks.compare`` and the like) still run and say where they
moved.
"""

__all__: list[str] = []
