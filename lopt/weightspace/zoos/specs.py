"""Architecture specs of zoo networks: plain JSON dicts and one factory.

A zoo on disk describes each of its networks by a *spec*, a JSON object, and
:func:`build_module` turns a spec into a fresh ``nn.Module`` whose
``state_dict`` keys and shapes are exactly those stored in the zoo. Loading a
zoo therefore never executes anything from its files.

Kinds:

``"siren"``: a sine-activated MLP (Sitzmann et al., 2020), the implicit
neural representation of one image or signal::

    {"kind": "siren", "widths": [2, 32, 32, 1], "w0": 30.0}

computes ``sin(w0 * (W x + b))`` in every hidden layer and a linear output.
Built as ``nn.Sequential(Linear, Sine, Linear, Sine, Linear)``, so the
state-dict keys are ``0.weight``, ``0.bias``, ``2.weight``, ...

``"cnn"``: a small convolutional classifier::

    {"kind": "cnn", "dim": 2, "in_channels": 1, "num_classes": 10,
     "channels": [8, 16, 16], "kernels": [3, 3, 3], "strides": [1, 2, 2],
     "activation": "relu", "batchnorm": false, "residual": false,
     "pool": "avg"}

One :class:`ConvBlock` per entry of ``channels`` (``conv -> [norm] ->
[+ shortcut] -> activation``, "same" padding), global pooling and a linear
head. With ``residual`` every block after the first adds a shortcut: the
identity when its input and output shapes agree, a 1x1 convolution (with the
block's stride, no bias) otherwise. With ``batchnorm`` the convolutions have
no bias and each is followed by ``BatchNorm{1,2}d``.

Any other kind, an activation outside :data:`ACTIVATIONS`, a missing or
unknown key or a value of the wrong type raises ``ValueError``.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

__all__ = [
    "ACTIVATIONS",
    "KINDS",
    "ConvBlock",
    "ConvNet",
    "Sine",
    "build_module",
    "init_state_dict",
    "normalize_spec",
]

#: Activation names a ``"cnn"`` spec may use, and the module each one builds.
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "elu": nn.ELU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
}

_POOLS = ("avg", "max")
_SIREN_DEFAULTS: dict[str, Any] = {"w0": 30.0}
_CNN_DEFAULTS: dict[str, Any] = {
    "dim": 2,
    "in_channels": 1,
    "num_classes": 10,
    "strides": None,  # all ones
    "batchnorm": False,
    "residual": False,
    "pool": "avg",
}
_REQUIRED = {"siren": ("widths",), "cnn": ("channels", "kernels", "activation")}
KINDS = tuple(_REQUIRED)


class Sine(nn.Module):
    """``sin(w0 * x)``, the SIREN activation."""

    def __init__(self, w0: float = 30.0):
        super().__init__()
        self.w0 = float(w0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(self.w0 * x)

    def extra_repr(self) -> str:
        return f"w0={self.w0}"


class ConvBlock(nn.Module):
    """``act(norm(conv(x)) + shortcut(x))``; ``norm`` and ``shortcut`` optional."""

    def __init__(
        self,
        conv: nn.Module,
        norm: nn.Module | None,
        act: nn.Module,
        shortcut: nn.Module | None,
    ):
        super().__init__()
        self.conv = conv
        self.norm = norm
        self.shortcut = shortcut
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if self.norm is not None:
            y = self.norm(y)
        if self.shortcut is not None:
            y = y + self.shortcut(x)
        return self.act(y)


class ConvNet(nn.Module):
    """Convolutional blocks, global pooling and a linear head.

    ``features`` maps inputs ``(B, C, *spatial)`` to pooled features
    ``(B, channels[-1])``; ``head`` maps those to logits. Zoo training calls
    the two parts separately to apply per-network dropout masks in between.
    """

    def __init__(self, features: nn.Sequential, head: nn.Linear):
        super().__init__()
        self.features = features
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _fail(spec: Any, why: str) -> ValueError:
    return ValueError(f"Invalid architecture spec {spec!r}: {why}")


def _int_list(spec: dict, key: str, *, minimum: int = 1) -> list[int]:
    value = spec[key]
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        or min(value) < minimum
    ):
        raise _fail(spec, f"{key!r} must be a non-empty list of ints >= {minimum}")
    return list(value)


def normalize_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """Check ``spec`` and return a copy with every default filled in.

    Raises:
        ValueError: unknown kind or activation, missing or unknown keys,
            values of the wrong type or shape.
    """
    if not isinstance(spec, dict):
        raise _fail(spec, "expected a dict")
    kind = spec.get("kind")
    if kind not in _REQUIRED:
        raise ValueError(
            f"Invalid architecture kind: {kind!r} (expected one of {list(KINDS)})"
        )
    defaults = _SIREN_DEFAULTS if kind == "siren" else _CNN_DEFAULTS
    missing = [k for k in _REQUIRED[kind] if k not in spec]
    unknown = sorted(set(spec) - set(defaults) - set(_REQUIRED[kind]) - {"kind"})
    if missing or unknown:
        raise _fail(spec, f"missing keys {missing}, unknown keys {unknown}")
    out = {**copy.deepcopy(defaults), **copy.deepcopy(spec)}
    if kind == "siren":
        widths = _int_list(out, "widths")
        if len(widths) < 2:
            raise _fail(spec, "'widths' needs an input and an output width")
        if not isinstance(out["w0"], (int, float)) or not out["w0"] > 0:
            raise _fail(spec, "'w0' must be a positive number")
        out["w0"] = float(out["w0"])
        return out
    channels = _int_list(out, "channels")
    kernels = _int_list(out, "kernels")
    if out["strides"] is None:
        out["strides"] = [1] * len(channels)
    strides = _int_list(out, "strides")
    if not len(channels) == len(kernels) == len(strides):
        raise _fail(spec, "'channels', 'kernels' and 'strides' differ in length")
    if any(k % 2 == 0 for k in kernels):
        raise _fail(spec, "kernel sizes must be odd ('same' padding)")
    if out["activation"] not in ACTIVATIONS:
        raise ValueError(
            f"Invalid activation: {out['activation']!r} "
            f"(expected one of {sorted(ACTIVATIONS)})"
        )
    if out["dim"] not in (1, 2):
        raise _fail(spec, "'dim' must be 1 or 2")
    if out["pool"] not in _POOLS:
        raise _fail(spec, f"'pool' must be one of {list(_POOLS)}")
    for key in ("in_channels", "num_classes"):
        if not isinstance(out[key], int) or isinstance(out[key], bool) or out[key] < 1:
            raise _fail(spec, f"{key!r} must be a positive int")
    for key in ("batchnorm", "residual"):
        if not isinstance(out[key], bool):
            raise _fail(spec, f"{key!r} must be true or false")
    return out


def _build_siren(spec: dict[str, Any]) -> nn.Sequential:
    widths, w0 = spec["widths"], spec["w0"]
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
        linear = nn.Linear(fan_in, fan_out)
        # SIREN init: the first layer spans [-1/fan_in, 1/fan_in]; later ones
        # are scaled by 1/w0 so pre-activations stay ~N(0, 1) at any depth.
        bound = 1 / fan_in if i == 0 else math.sqrt(6 / fan_in) / w0
        with torch.no_grad():
            linear.weight.uniform_(-bound, bound)
        layers.append(linear)
        if i < len(widths) - 2:
            layers.append(Sine(w0))
    return nn.Sequential(*layers)


def _build_cnn(spec: dict[str, Any]) -> ConvNet:
    conv_cls = nn.Conv1d if spec["dim"] == 1 else nn.Conv2d
    norm_cls = nn.BatchNorm1d if spec["dim"] == 1 else nn.BatchNorm2d
    pool_cls = {
        ("avg", 1): nn.AdaptiveAvgPool1d,
        ("avg", 2): nn.AdaptiveAvgPool2d,
        ("max", 1): nn.AdaptiveMaxPool1d,
        ("max", 2): nn.AdaptiveMaxPool2d,
    }[spec["pool"], spec["dim"]]
    blocks: list[nn.Module] = []
    c_in = spec["in_channels"]
    for i, (c_out, k, stride) in enumerate(
        zip(spec["channels"], spec["kernels"], spec["strides"])
    ):
        bn = spec["batchnorm"]
        conv = conv_cls(c_in, c_out, k, stride=stride, padding=k // 2, bias=not bn)
        shortcut: nn.Module | None = None
        if spec["residual"] and i > 0:
            if c_in == c_out and stride == 1:
                shortcut = nn.Identity()
            else:
                shortcut = conv_cls(c_in, c_out, 1, stride=stride, bias=False)
        act = ACTIVATIONS[spec["activation"]]()
        blocks.append(ConvBlock(conv, norm_cls(c_out) if bn else None, act, shortcut))
        c_in = c_out
    features = nn.Sequential(*blocks, pool_cls(1), nn.Flatten())
    return ConvNet(features, nn.Linear(c_in, spec["num_classes"]))


def build_module(spec: dict[str, Any]) -> nn.Module:
    """A freshly initialised module for an architecture spec.

    Initialisation draws from torch's global generator, as any module's
    does; use :func:`init_state_dict` for a seeded one.

    Raises:
        ValueError: the spec is malformed (see :func:`normalize_spec`).
    """
    spec = normalize_spec(spec)
    return _build_siren(spec) if spec["kind"] == "siren" else _build_cnn(spec)


def init_state_dict(spec: dict[str, Any], seed: int) -> dict[str, torch.Tensor]:
    """The initial ``state_dict`` of ``build_module(spec)`` under ``seed``.

    Leaves torch's global random stream as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = build_module(spec)
    return {k: v.detach().clone() for k, v in module.state_dict().items()}
