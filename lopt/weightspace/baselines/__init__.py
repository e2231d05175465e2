"""Baselines of the weight-space benchmark, in the same training harness as the
neural-graph models: a flattened-weights MLP, StatNN (per-layer weight
statistics, with an MLP or gradient-boosted trees), NFN, probe-only and image
predictors. Each consumes the same :class:`~lopt.weightspace.WeightSpaceData`.
"""

from lopt.weightspace.baselines import predictors
from lopt.weightspace.baselines.predictors import *  # noqa: F403  (its __all__)

__all__ = list(predictors.__all__)
