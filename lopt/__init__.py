"""lopt: learned optimizers on neural graphs.

``NGOptimizer(model.parameters())`` is a drop-in ``torch.optim`` optimizer whose
update rule is a graph network over the network's neurons and weights.

Layout, bottom up: :mod:`lopt.graph` and :mod:`lopt.nn` are the neural-graph
core both halves share; :mod:`lopt.optim` is the learned optimizer;
:mod:`lopt.integrations` connects it to other libraries (``higher``, FSDP2);
:mod:`lopt.tasks` holds the training tasks that meta-training and the
benchmarks share; :mod:`lopt.weightspace` learns from networks as data.
``import lopt`` loads the core and the optimizer only.
"""

from lopt import optim
from lopt.graph import NeuralGraph
from lopt.optim import *  # noqa: F403  (NGOptimizer, UpdateRule, ...: its __all__)

__version__ = "0.1.0"

__all__ = [
    "NeuralGraph",
    *optim.__all__,
    "DifferentiableNGOptimizer",  # noqa: F405  (from __getattr__ below)
    "__version__",
]


def __getattr__(name: str):
    # ``higher`` is an optional dependency: its integration (which registers
    # NGOptimizer with higher) is imported on first use, not by ``import lopt``.
    if name == "DifferentiableNGOptimizer":
        from lopt.integrations.higher import DifferentiableNGOptimizer

        return DifferentiableNGOptimizer
    raise AttributeError(f"module 'lopt' has no attribute {name!r}")
