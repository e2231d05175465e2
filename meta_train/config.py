"""Meta-training configurations and presets (saved as JSON next to checkpoints)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

__all__ = ["MetaTrainConfig", "PRESETS", "preset", "VAL_METRICS"]

VAL_METRICS = ("tail", "final")


def _check_overrides(config: MetaTrainConfig) -> None:
    """Each override dict names only fields of the class it overrides (the
    rule's may also use the step-size controller's old ``step_adapt_*``
    names), so that a typo fails here, not hours into a run."""
    from lopt.optim.rule import RuleConfig
    from lopt.optim.step_size import LEGACY_FIELDS, StepSizeConfig
    from lopt.tasks.families import MLPFamily

    known = {
        "rule": {f.name for f in fields(RuleConfig)} | set(LEGACY_FIELDS),
        "step_size": {f.name for f in fields(StepSizeConfig)},
        "family": {f.name for f in fields(MLPFamily)},
        "val_family": {f.name for f in fields(MLPFamily)},
    }
    for name, allowed in known.items():
        value = getattr(config, name)
        if not isinstance(value, dict):
            raise ValueError(f"Invalid {name}: {value!r} (expected a dict)")
        unknown = sorted(set(value) - allowed)
        if unknown:
            raise ValueError(
                f"Invalid {name} overrides: {unknown} (known: {sorted(allowed)})"
            )


@dataclass(frozen=True)
class MetaTrainConfig:
    """Outer-loop settings. Plain keyword arguments, no global config."""

    iterations: int = 1000  # outer (meta) steps
    num_tasks: int = 4  # inner tasks unrolled per meta-step (persistent slots)
    truncation: int = 10  # inner steps per truncation
    horizon: tuple[int, int] = (100, 2000)  # inner steps per task, log-uniform
    # Before a slot's first truncation, train it this many steps (log-uniform)
    # with the current rule and no meta-gradient, so truncations also see late
    # training; (0, 0) = start every task at step 0.
    warm_start: tuple[int, int] = (0, 0)
    outer_lr: float = 3e-3
    outer_lr_final: float = 3e-4  # cosine decay to this
    clip_norm: float = 1.0
    estimator: str = "tbptt"  # "tbptt" (truncated backprop) or "pes" (antithetic PES)
    pes_sigma: float = 0.01  # std of PES perturbations of the rule's weights
    seed: int = 0
    val_every: int = 50  # meta-steps between validations
    val_steps: int = 300  # inner steps per validation task
    val_tasks: int = 4
    val_metric: str = "tail"  # "tail" or "final", see meta_train.trainer.validate
    # overrides of MLPFamily fields for validation tasks
    val_family: dict[str, Any] = field(default_factory=dict)
    checkpoint_every: int = 10
    threads: int = 0  # torch threads; 0 leaves torch's default
    rule: dict[str, Any] = field(default_factory=dict)  # overrides of RuleConfig
    # overrides of lopt.optim.step_size.StepSizeConfig (the rule's controller)
    step_size: dict[str, Any] = field(default_factory=dict)
    init_rule: str = ""  # rule directory to start from (fine-tuning); "" = Adam init
    # With init_rule and rule overrides of another architecture: copy the
    # init rule's parameters whose names and shapes match, keep the rest at
    # their (Adam-equivalent) initialisation.
    init_partial: bool = False
    family: dict[str, Any] = field(default_factory=dict)  # overrides of MLPFamily
    # Meta-train only the rule parameters whose names start with one of these
    # (e.g. the heads' output layers, for a low-variance PES fine-tune); () = all.
    train_only: tuple[str, ...] = ()

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> MetaTrainConfig:
        data = json.loads(text)
        data["horizon"] = tuple(data["horizon"])
        data["warm_start"] = tuple(data.get("warm_start", (0, 0)))
        data["train_only"] = tuple(data.get("train_only", ()))
        return cls(**data)

    def __post_init__(self):
        from meta_train.estimators import ESTIMATORS

        if self.estimator not in ESTIMATORS:
            raise ValueError(
                f"Invalid estimator: {self.estimator!r} (expected one of {ESTIMATORS})"
            )

        low, high = self.warm_start
        if not (0 <= low <= high) or (high > 0 and low < 1):
            raise ValueError(
                f"Invalid warm_start: {self.warm_start} (expected (0, 0) or "
                "(low, high) with 1 <= low <= high)"
            )

        _check_overrides(self)

        if self.val_metric not in VAL_METRICS:
            raise ValueError(
                f"Invalid val_metric: {self.val_metric!r} "
                f"(expected one of {VAL_METRICS})"
            )

    def save(self, path: Path) -> None:
        Path(path).write_text(self.to_json())


PRESETS = {
    # Seconds: used by tests and as a check that the pipeline runs.
    "smoke": MetaTrainConfig(
        iterations=6,
        num_tasks=2,
        truncation=4,
        horizon=(8, 30),
        val_every=3,
        val_steps=20,
        val_tasks=2,
        checkpoint_every=2,
        family={
            "widths": [8, 16],
            "max_depth": 2,
            "batch_sizes": [32],
            "conv_prob": 0.5,
        },
    ),
    # Stage 1 of the shipped rule (experiment 6 of
    # benchmarks/results/meta_train/EXPERIMENTS.md): truncated backprop with a low
    # outer learning rate, log fan-in/fan-out node features, MLPs up to 128 wide,
    # validated every 25 meta-steps on the final loss of 1500-step runs on 8
    # tasks up to 256 wide. Its best checkpoint comes early (iteration 25,
    # minutes on 2 CPU cores); later ones validate worse (short-horizon bias),
    # so 400 iterations (about 2 hours) are plenty.
    "default": MetaTrainConfig(
        iterations=400,
        num_tasks=4,
        truncation=10,
        horizon=(100, 3000),
        estimator="tbptt",
        outer_lr=5e-4,
        outer_lr_final=5e-5,
        val_every=25,
        val_steps=1500,
        val_tasks=8,
        val_metric="final",
        checkpoint_every=10,
        rule={"degree_features": True},
        family={"widths": [16, 32, 64, 128]},
        val_family={"widths": [16, 32, 64, 128, 256]},
    ),
}
# Stage 2, the shipped rule (experiment 9): stage 1's best rule fine-tuned on
# warm-started tasks (trained 10-5000 steps by the current rule before the
# truncations start), so meta-gradients see the late phase of long runs;
# validated on 3000-step runs. About 40 minutes on 2 CPU cores; best at
# iteration 20.
PRESETS["warm_finetune"] = replace(
    PRESETS["default"],
    init_rule="runs/default/best_rule",
    warm_start=(10, 5000),
    horizon=(100, 1000),
    iterations=100,
    outer_lr=2e-4,
    outer_lr_final=2e-5,
    val_steps=3000,
    val_every=10,
)


def preset(name: str, **overrides) -> MetaTrainConfig:
    """A preset by name, with keyword overrides."""
    if name not in PRESETS:
        raise ValueError(
            f"Invalid preset: {name!r} (expected one of {sorted(PRESETS)})"
        )
    return replace(PRESETS[name], **overrides)
