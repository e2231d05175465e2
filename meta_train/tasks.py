"""Tasks and task families for meta-training.

A :class:`TaskFamily` samples a JSON-serialisable :class:`TaskConfig` from a
``torch.Generator``; :func:`make_task` turns a config into a :class:`Task`:
initial parameters, a functional loss through ``torch.func.functional_call``
and a batch sampler. Architectures here are deliberately *smaller* than those
of the benchmark suite, so the benchmarks measure generalisation.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn
from torch.func import functional_call

from benchmarks.suite import SequenceClassifier
from meta_train.data import load_dataset

__all__ = ["TaskConfig", "Task", "TaskFamily", "MLPFamily", "make_task"]

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "silu": nn.SiLU}


@dataclass(frozen=True)
class TaskConfig:
    """Everything needed to rebuild a task exactly."""

    dataset: str  # name in meta_train.data.DATASETS
    hidden: tuple[int, ...]  # hidden widths (MLP) or channels (conv1d)
    activation: str  # key of ACTIVATIONS
    init_scale: float  # multiplier of PyTorch's default init
    batch_size: int
    seed: int  # initial weights
    reparam: tuple[float, ...] = ()  # per-tensor weight re-parametrisation (or empty)
    grad_noise: float = 0.0  # std of gradient noise relative to gradient RMS
    kind: str = (
        "mlp"  # "mlp", "conv1d" (1-D CNN pooled over the sequence), "gru", "lstm"
    )
    # Features multiplied by fixed per-feature factors 10^u, u uniform in
    # [-input_spread, input_spread] (drawn from the seed): unscaled inputs.
    input_spread: float = 0.0

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> TaskConfig:
        data = dict(data)
        data["hidden"] = tuple(data["hidden"])
        data["reparam"] = tuple(data.get("reparam", ()))
        return cls(**data)


class Task:
    """A training problem seen functionally: ``loss(params, batch)``."""

    def __init__(self, config: TaskConfig):
        self.config = config
        self.data = load_dataset(config.dataset)
        torch.manual_seed(config.seed)
        self.module = _build_module(
            config, self.data.num_features, self.data.num_classes
        )
        self.names = [n for n, _ in self.module.named_parameters()]
        self.input_scales = _input_scales(config, self.data.num_features)
        scale = torch.tensor(config.reparam) if config.reparam else None
        # With re-parametrisation the network uses w_eff = c * w: the optimizer
        # sees w = w_eff / c, i.e. the same function at another scale.
        self.scales = scale
        self.init_params = [
            p.detach() * config.init_scale / (1.0 if scale is None else scale[i])
            for i, p in enumerate(self.module.parameters())
        ]

    def loss(self, params: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor):
        if self.scales is not None:
            params = [p * c for p, c in zip(params, self.scales.tolist())]
        out = functional_call(self.module, dict(zip(self.names, params)), (x,))
        return nn.functional.cross_entropy(out, y)

    def _inputs(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.input_scales is None else x * self.input_scales

    def batch(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(
            len(self.data.x_train), (self.config.batch_size,), generator=generator
        )
        return self._inputs(self.data.x_train[idx]), self.data.y_train[idx]

    def validation_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._inputs(self.data.x_test), self.data.y_test


def _input_scales(config: TaskConfig, num_features: int) -> torch.Tensor | None:
    """Per-feature input factors of ``config.input_spread`` (``None``: none)."""
    if not config.input_spread:
        return None
    gen = torch.Generator().manual_seed(config.seed + 1)
    u = 2.0 * torch.rand(num_features, generator=gen) - 1.0
    return 10.0 ** (config.input_spread * u)


#: Sequence lengths of the recurrent tasks, per dataset (features = steps x inputs).
SEQUENCE_STEPS = {"mnist1d": 8, "digits": 8}


def _build_module(config: TaskConfig, num_features: int, num_classes: int) -> nn.Module:
    act = ACTIVATIONS[config.activation]
    layers: list[nn.Module] = []
    if config.kind == "mlp":
        width = num_features
        for h in config.hidden:
            layers += [nn.Linear(width, h), act()]
            width = h
        layers.append(nn.Linear(width, num_classes))
    elif config.kind == "conv1d":
        channels = 1
        layers.append(nn.Unflatten(1, (1, num_features)))
        for h in config.hidden:
            layers += [nn.Conv1d(channels, h, 3, padding=1), act(), nn.MaxPool1d(2)]
            channels = h
        layers += [
            nn.AdaptiveAvgPool1d(1),
            nn.Flatten(),
            nn.Linear(channels, num_classes),
        ]
    elif config.kind in ("gru", "lstm"):
        if len(config.hidden) != 1:
            raise ValueError(
                f"Invalid hidden for a {config.kind} task: {config.hidden} "
                "(one hidden width)"
            )
        steps = SEQUENCE_STEPS[config.dataset]
        return SequenceClassifier(
            num_features, steps, config.hidden[0], num_classes, config.kind
        )
    else:
        raise ValueError(f"Invalid task kind: {config.kind!r}")
    return nn.Sequential(*layers)


class TaskFamily:
    """Samples task configurations; subclasses define the distribution."""

    def sample(self, generator: torch.Generator) -> TaskConfig:  # pragma: no cover
        raise NotImplementedError


def _choice(options, generator):
    return options[int(torch.randint(len(options), (1,), generator=generator))]


def _draw(generator) -> float:
    return float(torch.rand((), generator=generator))


def _log_uniform(low: float, high: float, generator) -> float:
    u = float(torch.rand((), generator=generator))
    return math.exp(math.log(low) + u * (math.log(high) - math.log(low)))


@dataclass
class MLPFamily(TaskFamily):
    """Small MLP classifiers (and, with probability ``conv_prob``, 1-D CNNs on
    mnist1d) of random depth, width, activation and init scale on mnist1d and
    digits, with optional weight re-parametrisation and gradient noise."""

    datasets: tuple[str, ...] = ("mnist1d", "digits")
    widths: tuple[int, ...] = (16, 32, 64)
    max_depth: int = 3
    min_depth: int = 1  # 0 adds linear models (multinomial logistic regression)
    batch_sizes: tuple[int, ...] = (32, 64, 128)
    init_scale: tuple[float, float] = (0.5, 2.0)
    reparam_prob: float = 0.3  # probability of weight re-parametrisation
    grad_noise_prob: float = 0.2
    conv_prob: float = 0.25  # probability of a 1-D CNN on mnist1d instead of an MLP
    # Probability of a GRU or LSTM (one hidden layer of a sampled width), and
    # of unscaled inputs (features times 10^u, |u| <= input_spread). Both 0 by
    # default: a family without them samples exactly the tasks it always did.
    recurrent_prob: float = 0.0
    unscaled_prob: float = 0.0
    input_spread: float = 2.0

    def sample(self, generator: torch.Generator) -> TaskConfig:
        if not 0 <= self.min_depth <= self.max_depth:
            raise ValueError(
                f"Invalid depths: min_depth {self.min_depth}, "
                f"max_depth {self.max_depth}"
            )
        span = self.max_depth - self.min_depth + 1
        depth = self.min_depth + int(torch.randint(span, (1,), generator=generator))
        hidden = tuple(_choice(self.widths, generator) for _ in range(depth))
        reparam: tuple[float, ...] = ()
        if float(torch.rand((), generator=generator)) < self.reparam_prob:
            reparam = tuple(
                round(_log_uniform(0.1, 10.0, generator), 4)
                for _ in range(2 * depth + 2)
            )
        noise = 0.0
        if float(torch.rand((), generator=generator)) < self.grad_noise_prob:
            noise = round(_log_uniform(0.01, 0.3, generator), 4)
        conv = float(torch.rand((), generator=generator)) < self.conv_prob and depth > 0
        dataset = _choice(self.datasets, generator)
        config = TaskConfig(
            kind="conv1d" if conv else "mlp",
            dataset="mnist1d" if conv else dataset,
            hidden=hidden,
            activation=_choice(sorted(ACTIVATIONS), generator),
            init_scale=round(_log_uniform(*self.init_scale, generator), 4),
            batch_size=_choice(self.batch_sizes, generator),
            seed=int(torch.randint(2**31 - 1, (1,), generator=generator)),
            reparam=reparam,
            grad_noise=noise,
        )
        # Drawn only when asked for, after everything else, so that families
        # without them keep their random stream (and their tasks).
        if self.recurrent_prob and _draw(generator) < self.recurrent_prob:
            config = replace(
                config,
                kind=_choice(("gru", "lstm"), generator),
                hidden=(_choice(self.widths, generator),),
                reparam=(),  # one factor per tensor: the MLP's count is wrong
            )
        if self.unscaled_prob and _draw(generator) < self.unscaled_prob:
            config = replace(config, input_spread=self.input_spread)
        return config


def make_task(config: TaskConfig) -> Task:
    """Build the :class:`Task` of a configuration."""
    return Task(config)
