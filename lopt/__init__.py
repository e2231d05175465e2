"""lopt: learned optimizers on neural graphs.

``NGOptimizer(model.parameters())`` is a drop-in ``torch.optim`` optimizer whose
update rule is a graph network over the network's neurons and weights.
"""

from lopt.features import FeatureState
from lopt.functional import init_state, ng_step
from lopt.graph import NeuralGraph
from lopt.higher import DifferentiableNGOptimizer  # registers NGOptimizer with higher
from lopt.optimizer import SHIPPED_RULES, NGOptimizer, default_rule_path
from lopt.rule import RuleConfig, UpdateRule, load_rule, save_rule

__version__ = "0.1.0"

__all__ = [
    "NGOptimizer",
    "DifferentiableNGOptimizer",
    "NeuralGraph",
    "UpdateRule",
    "RuleConfig",
    "FeatureState",
    "ng_step",
    "init_state",
    "save_rule",
    "load_rule",
    "default_rule_path",
    "SHIPPED_RULES",
    "__version__",
]
