"""Benchmarks of the learned optimizer, each a ``python -m`` command with a thin
``main(argv)`` over plain functions:

* ``python -m benchmarks.optim.compare``: ``NGOptimizer`` on the held-out suite
  against Adam at its default learning rate, Adam, AdamW and SGD-momentum tuned
  per task, and the tuning-free optimizers;
* ``python -m benchmarks.optim.overhead``: step time and peak memory against
  ``torch.optim.Adam`` as the parameter count grows;
* ``python -m benchmarks.optim.scaling``: the advantage over Adam as MLP width
  and depth grow past what meta-training saw;
* ``python -m benchmarks.optim.import_time``: ``import lopt`` against
  ``import torch``.

All data is embedded (scikit-learn toy sets, procedurally generated
``mnist1d``, synthetic sequences): nothing is downloaded.
"""
