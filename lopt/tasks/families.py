"""The meta-training task family.

A :class:`TaskFamily` samples a JSON-serialisable :class:`TaskConfig` from a
``torch.Generator``; :func:`make_task` turns a config into a
:class:`~lopt.tasks.task.Task`, the task class of the benchmark suite too: a
seeded model, a seeded batch sampler, the loss for a module and functionally
for a list of parameter tensors (meta-training's unrolls), and a held-out
evaluation. Architectures here are deliberately *smaller* than those of the
benchmark suite, so the benchmarks measure generalisation.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn
from torch.func import functional_call

from lopt.tasks import data
from lopt.tasks.data import Dataset
from lopt.tasks.suite import SequenceClassifier
from lopt.tasks.task import ACCURACY, Task, cross_entropy

__all__ = [
    "FAMILY_DATASETS",
    "load_family_dataset",
    "TaskConfig",
    "Task",
    "TaskFamily",
    "MLPFamily",
    "make_task",
    "describe",
    "input_scales",
    "Reparametrised",
]

#: The family's data set names (those a :class:`TaskConfig` records in checkpoints
#: and rule provenance) -> names in :data:`lopt.tasks.data.DATASETS`. They are
#: the family's own variants, not the suite's ``"mnist1d"`` and ``"digits"``.
FAMILY_DATASETS: dict[str, str] = {"mnist1d": "meta_mnist1d", "digits": "meta_digits"}


def load_family_dataset(name: str) -> Dataset:
    """The family's data set ``name`` (a key of :data:`FAMILY_DATASETS`).

    Raises:
        ValueError: for a name the family does not know, listing the known ones.
    """
    if name not in FAMILY_DATASETS:
        raise ValueError(
            f"Invalid dataset: {name!r} (expected one of {sorted(FAMILY_DATASETS)})"
        )
    return data.load_dataset(FAMILY_DATASETS[name])


ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "silu": nn.SiLU}
#: Architectures of the family (``TaskConfig.kind``).
KINDS = ("mlp", "conv1d", "gru", "lstm")


@dataclass(frozen=True)
class TaskConfig:
    """Everything needed to rebuild a task exactly."""

    dataset: str  # key of FAMILY_DATASETS
    hidden: tuple[int, ...]  # hidden widths (MLP) or channels (conv1d)
    activation: str  # key of ACTIVATIONS
    init_scale: float  # multiplier of PyTorch's default init
    batch_size: int
    seed: int  # initial weights (and the batches of validation runs)
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


def make_task(config: TaskConfig) -> Task:
    """The :class:`~lopt.tasks.task.Task` of a configuration.

    Its run seed is ``config.seed``: ``make_model(config.seed)`` holds the
    initial weights the config describes (PyTorch's default initialisation
    at that seed, times ``init_scale``, divided by the re-parametrisation
    factors) and ``batch_generator(config.seed)`` is a generator seeded with
    ``config.seed``, which meta-training's validation and ``meta_train.select``
    draw their batches from. Unscaled inputs are part of the task's data set
    (features times the config's fixed factors, train and held-out alike).

    Raises:
        ValueError: for a kind, activation or data set the family does not
            have, or a recurrent task with other than one hidden width.
    """
    _check(config)
    return Task(
        name=f"{config.kind}-{config.dataset}-seed{config.seed}",
        description=describe(config),
        load_data=_loader(config),
        build=functools.partial(_build_model, config),
        loss_fn=cross_entropy,
        metric=ACCURACY,
        batch_size=config.batch_size,
        batch_seed=_own_seed,
    )


def describe(config: TaskConfig) -> str:
    """One line naming the task of ``config`` (``meta_train.select`` prints it)."""
    spread = f" inputs 10^+-{config.input_spread:g}" if config.input_spread else ""
    return (
        f"{config.kind} {config.dataset} {config.hidden} {config.activation} "
        f"bs={config.batch_size} seed={config.seed}{spread}"
    )


def _own_seed(seed: int) -> int:
    """The family's batch-generator seed of run ``seed``: the seed itself."""
    return seed


def _check(config: TaskConfig) -> None:
    if config.kind not in KINDS:
        raise ValueError(
            f"Invalid task kind: {config.kind!r} (expected one of {KINDS})"
        )
    if config.activation not in ACTIVATIONS:
        raise ValueError(
            f"Invalid activation: {config.activation!r} "
            f"(expected one of {sorted(ACTIVATIONS)})"
        )
    if config.dataset not in FAMILY_DATASETS:
        raise ValueError(
            f"Invalid dataset: {config.dataset!r} "
            f"(expected one of {sorted(FAMILY_DATASETS)})"
        )
    if config.kind in ("gru", "lstm") and len(config.hidden) != 1:
        raise ValueError(
            f"Invalid hidden for a {config.kind} task: {config.hidden} "
            "(one hidden width)"
        )


def _loader(config: TaskConfig) -> Callable[[], Dataset]:
    """The task's data: the family's data set, with its features times the
    config's input factors when it has unscaled inputs (made once per task)."""
    load = functools.partial(load_family_dataset, config.dataset)
    if not config.input_spread:
        return load

    @functools.cache
    def unscaled() -> Dataset:
        data = load()
        scales = input_scales(config, data.num_features)
        return Dataset(
            data.x_train * scales,
            data.y_train,
            data.x_test * scales,
            data.y_test,
            data.num_classes,
        )

    return unscaled


def input_scales(config: TaskConfig, num_features: int) -> torch.Tensor | None:
    """Per-feature input factors of ``config.input_spread`` (``None``: none):
    ``10^u``, ``u`` uniform in ``[-input_spread, input_spread]``, drawn from a
    generator seeded ``config.seed + 1``."""
    if not config.input_spread:
        return None
    gen = torch.Generator().manual_seed(config.seed + 1)
    u = 2.0 * torch.rand(num_features, generator=gen) - 1.0
    return 10.0 ** (config.input_spread * u)


class Reparametrised(nn.Module):
    """``net`` with each parameter tensor re-parametrised as ``w_eff = c * w``.

    The module's parameters are the ``w`` (``net``'s parameters hold them, in
    ``net``'s order); its forward pass is ``net``'s with ``c * w`` in their
    place: the same function at another scale, as an optimizer sees it.

    Args:
        net: the network.
        factors: one ``c`` per parameter tensor of ``net``.
    """

    def __init__(self, net: nn.Module, factors: list[float]):
        super().__init__()
        self.net = net
        self.factors = list(factors)
        self._names = [name for name, _ in net.named_parameters()]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scaled = [p * c for p, c in zip(self.net.parameters(), self.factors)]
        return functional_call(self.net, dict(zip(self._names, scaled)), (x,))


def _build_model(config: TaskConfig, data: Dataset) -> nn.Module:
    """The model of ``config`` at its initial weights (called by
    :meth:`~lopt.tasks.task.Task.make_model` under a fixed seed): PyTorch's
    initialisation times ``init_scale``, divided by the re-parametrisation
    factors if any, which then scale each tensor in the forward pass."""
    net = _build_module(config, data.num_features, data.num_classes)
    params = list(net.parameters())
    if config.reparam and len(config.reparam) != len(params):
        raise ValueError(
            f"Invalid reparam: {len(config.reparam)} factors for a model with "
            f"{len(params)} parameter tensors"
        )
    factors = torch.tensor(config.reparam) if config.reparam else None
    with torch.no_grad():
        for i, p in enumerate(params):
            p.mul_(config.init_scale)
            if factors is not None:
                p.div_(factors[i])
    if factors is None:
        return net
    return Reparametrised(net, factors.tolist())


#: Sequence lengths of the recurrent tasks, per dataset (features = steps x inputs).
SEQUENCE_STEPS = {"mnist1d": 8, "digits": 8}


def _build_module(config: TaskConfig, num_features: int, num_classes: int) -> nn.Module:
    """The network of ``config`` at PyTorch's default initialisation."""
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
    elif config.kind in ("gru", "lstm"):  # one hidden width (see _check)
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
