"""Meta-training of lopt update rules by truncated unrolls."""

from lopt.tasks.families import MLPFamily, Task, TaskConfig, TaskFamily, make_task
from meta_train.config import PRESETS, MetaTrainConfig, preset
from meta_train.trainer import MetaTrainer, validate
from meta_train.unroll import InnerState, new_inner_state, truncated_unroll

__all__ = [
    "MetaTrainConfig",
    "PRESETS",
    "preset",
    "MLPFamily",
    "Task",
    "TaskConfig",
    "TaskFamily",
    "make_task",
    "MetaTrainer",
    "validate",
    "InnerState",
    "new_inner_state",
    "truncated_unroll",
]
