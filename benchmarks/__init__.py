"""Benchmarks for lopt: a held-out task suite, overhead and scaling studies.

Three commands, each a thin ``main(argv)`` over plain functions:

* ``python -m benchmarks.compare``: ``NGOptimizer`` against Adam at its default
  learning rate and against Adam, AdamW and SGD-momentum tuned per task;
* ``python -m benchmarks.overhead``: optimizer step time and peak memory against
  ``torch.optim.Adam`` as the parameter count grows;
* ``python -m benchmarks.scaling``: the advantage over Adam as MLP width and
  depth grow past what meta-training saw.

All data is embedded (scikit-learn toy sets, procedurally generated
``mnist1d``, synthetic sequences): nothing is downloaded.
"""

__all__: list[str] = []
