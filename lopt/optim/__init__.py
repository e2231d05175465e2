"""The learned optimizer: :class:`NGOptimizer` over the functional step
:func:`ng_step`, the update rule (:class:`UpdateRule`, saved as safetensors +
JSON) and the per-scalar features it reads. ``fused/`` holds the fast dense
path; ``rules/`` the rules that ship with the package."""

from lopt.optim.features import FeatureState
from lopt.optim.functional import init_state, ng_step
from lopt.optim.optimizer import SHIPPED_RULES, NGOptimizer, default_rule_path
from lopt.optim.rule import RuleConfig, UpdateRule, load_rule, save_rule

__all__ = [
    "NGOptimizer",
    "UpdateRule",
    "RuleConfig",
    "FeatureState",
    "ng_step",
    "init_state",
    "save_rule",
    "load_rule",
    "default_rule_path",
    "SHIPPED_RULES",
]
