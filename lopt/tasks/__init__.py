"""The task layer shared by meta-training and the benchmarks.

A :class:`Task` is a seeded model, a seeded batch sampler, a train loss and a
held-out metric on an embedded data set (:mod:`.data`); :mod:`.suite` is the
held-out suite, :mod:`.families` meta-training's task family, and
:mod:`.loop` the one inner training loop that runs any of them. Needs the
``tasks`` extra (scikit-learn, mnist1d) for its data sets.
"""

from lopt.tasks.data import DATASETS, Dataset, load_dataset
from lopt.tasks.families import MLPFamily, TaskConfig, TaskFamily, make_task
from lopt.tasks.loop import EvalWeights, ModuleLearner, RuleLearner, run
from lopt.tasks.suite import TASKS, get_tasks
from lopt.tasks.task import ACCURACY, MSE, HeldOutMetric, Task

__all__ = [
    "Dataset",
    "DATASETS",
    "load_dataset",
    "Task",
    "HeldOutMetric",
    "ACCURACY",
    "MSE",
    "TASKS",
    "get_tasks",
    "TaskConfig",
    "TaskFamily",
    "MLPFamily",
    "make_task",
    "EvalWeights",
    "ModuleLearner",
    "RuleLearner",
    "run",
]
