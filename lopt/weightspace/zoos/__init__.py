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
missing chunk and gives the same bytes as an uninterrupted build. Measured on
this machine: identical bytes across processes and across 1 and 2 torch
threads; another CPU or BLAS build may round differently.

Build times, measured with ``--threads 1`` (faster than 2 on this shared
2-core machine, where other engineers' jobs kept the load average at 1-3;
during the full builds this repository's slow tests also ran for a few
minutes; digits_inr re-timed at w0 = 8, 200 quick steps, next to a
benchmark on the other core; the cnn_digits range is two builds in two
sessions, the faster side by side with a cnn_wild build only); peak RSS of the
whole process, torch included:

=========== ============================ =============================================
zoo         quick                        full
=========== ============================ =============================================
digits_inr  1,024 nets, 13 s, 609 MiB    35,940 nets, 633 s, 653 MiB, 190 MB
mnist1d_inr 1,000 nets, 13 s, 502 MiB    50,000 nets, 734 s, 533 MiB, 241 MB
cnn_digits  144 nets, 15 s, 483 MiB      6,144 nets, 444-903 s, 522-605 MiB, 92 MB
cnn_wild    96 nets, 28 s, 394 MiB       10,368 nets, 2,044-2,434 s, 592-703 MiB, 376 MB
=========== ============================ =============================================

Quick: digits 256 images x 2 views x (image, dilated), 200 steps; mnist1d
500 signals x 2 views, 150 steps; 48 runs x checkpoints at 20/80/240 steps;
8 architectures x 6 runs x 40/160 steps. Full: all 1,797 digits x 10 views x
2, 300 steps (median PSNR 118 dB, min 42 dB); all
5,000 mnist1d signals x 10 views, 300 steps; 1,024 runs x 6 checkpoints
(25 to 800 steps); 288 architectures x 12 runs x 3 checkpoints (50/150/400),
206 families, 52 of them test-only (three builds in two sessions, each beside
a benchmark). The earlier full cnn_wild, 96 architectures (``--set
architectures=96``), had 3,456 nets and built in 754-1,279 s at 529-585 MiB,
111 MB on disk.
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
