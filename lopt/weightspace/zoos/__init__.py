"""Model zoos for the weight-space tasks: built here, deterministic from a
seed, cached to disk (safetensors + JSON), resumable, with a progress bar.

Zoos (``size="quick"`` feeds quick benchmarks; ``"full"`` is for real runs):

- ``digits_inr``: SIRENs [2, 32, 32, 1], w0 = 8, fitted to the 8x8
  scikit-learn digits, ``views`` inits per image, each with its dilated-image
  counterpart (INR classification and editing). Label: digit class.
- ``mnist1d_inr``: SIRENs [1, 32, 32, 1] fitted to mnist1d signals.
- ``cnn_digits``: one small CNN trained on digits with random
  hyperparameters, several checkpoints per run (Small CNN Zoo style). Label:
  held-out accuracy.
- ``cnn_wild``: CNNs of varied depth, width, kernel, activation, residuals
  and BatchNorm (CNN Wild Park style); whole architecture families are
  test-only. Label: held-out accuracy.

Usage::

    python -m lopt.weightspace.zoos build digits_inr --out zoos/digits_inr --quick
    python -m lopt.weightspace.zoos info zoos/digits_inr

    from lopt.weightspace.zoos import build_zoo
    from lopt.weightspace.zoos.store import load_zoo
    zoo = load_zoo(build_zoo("digits_inr", "zoos/digits_inr", size="quick"))
    zoo.module(0), zoo.labels, zoo.split("test")

A build killed at any point resumes, with the same command, at the first
missing chunk and gives the same bytes as an uninterrupted build, also in
another process or at 1 or 2 torch threads; another CPU or BLAS build may
round differently.

=========== ============ ============
zoo         quick nets   full nets
=========== ============ ============
digits_inr  1,024        35,940
mnist1d_inr 1,000        50,000
cnn_digits  144          6,144
cnn_wild    96           10,368
=========== ============ ============

Quick: digits 256 images x 2 views x (image, dilated), 200 steps; mnist1d
500 signals x 2 views, 150 steps; 48 runs x checkpoints at 20/80/240 steps;
8 architectures x 6 runs x 40/160 steps. Full: all 1,797 digits x 10 views x
2, 300 steps; all 5,000 mnist1d signals x 10 views, 300 steps; 1,024 runs x
6 checkpoints (25 to 800 steps); 288 architectures x 12 runs x 3 checkpoints
(50/150/400), 206 families, 52 of them test-only. Build times, memory and
sizes on disk: ``docs/design-notes-code.md``.
"""

from lopt.weightspace.zoos.build import (
    SIZES,
    ZOO_NAMES,
    build_zoo,
    main,
    preset_differences,
    zoo_config,
)
from lopt.weightspace.zoos.store import load_zoo

__all__ = [
    "SIZES",
    "ZOO_NAMES",
    "build_zoo",
    "load_zoo",
    "main",
    "preset_differences",
    "zoo_config",
]
