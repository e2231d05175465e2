"""The learned update rule: graph backbone plus per-edge and per-node heads.

An :class:`UpdateRule` maps ``(graph, per-scalar features, time features)`` to
one update per scalar parameter. Each head predicts a direction ``d`` and a
log-magnitude ``m``; the update is

    update = -step_scale * d * exp(magnitude_scale * softclip(m))

The heads have a linear skip path from the scalar's own features that is
initialised to the Adam ratio ``m_hat / sqrt(v_hat)`` (beta1 = 0.9) while the
learned path starts at zero, so an untrained rule *is* Adam with learning rate
``step_scale``. Meta-training learns corrections from there; this keeps early
meta-training stable and gives every rule a sane floor.

A rule carries the per-tensor step-size controller it was tuned with
(``UpdateRule.step_size``, a :class:`~lopt.optim.step_size.StepSizeConfig`;
off unless given): a separate component that multiplies each tensor's update
by a step size it adapts (the shipped default rule has it on).

Rules are saved as a directory with ``weights.safetensors`` and
``config.json`` (format version, feature set, widths, the controller's
settings, provenance). Loading never executes code from the files; files
written before the controller had its own config (format versions 1 and 2,
``step_adapt_*`` fields in the rule config) load into the same two parts.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file
from torch import nn

from lopt.graph import EDGE_ATTR_DIM, NODE_ATTR_DIM, NUM_SLOT_TYPES, NeuralGraph
from lopt.nn import GraphBackbone
from lopt.nn.conv import channel_linear
from lopt.optim.features import (
    ADAM_RATIO_FEATURE,
    FEATURE_NAMES,
    MOMENTUM_DECAYS,
    NUM_FEATURES,
    NUM_TIME_FEATURES,
    TIME_SCALES,
)
from lopt.optim.step_size import LEGACY_FIELDS, StepSizeConfig, split_legacy_fields

__all__ = [
    "RuleConfig",
    "UpdateRule",
    "save_rule",
    "load_rule",
    "blend_with_untrained",
    "FORMAT_VERSION",
]

#: Version 2 added ``weights_sha256`` (the SHA-256 of the weights file) to the
#: config; version 1 files still load, with a warning that they are unverified.
#: Version 3 moved the step-size controller's settings out of ``rule_config``
#: (``step_adapt_*``) into their own ``step_size`` entry.
FORMAT_VERSION = 3
_READABLE_VERSIONS = (1, 2, 3)
_FORMAT_NAME = "lopt-rule"
WEIGHTS_FILE = "weights.safetensors"
CONFIG_FILE = "config.json"

NODE_IN_DIM = NODE_ATTR_DIM + NUM_TIME_FEATURES + NUM_SLOT_TYPES * (NUM_FEATURES + 1)
EDGE_IN_DIM = NUM_FEATURES + EDGE_ATTR_DIM
NUM_DEGREE_FEATURES = 2
#: log(1 + degree) is divided by this: about 1 for a node with 20k edges.
DEGREE_SCALE = 10.0


@dataclass(frozen=True)
class RuleConfig:
    """Architecture and output constants of an :class:`UpdateRule`."""

    node_dim: int = 32  # width of node embeddings
    edge_dim: int = 4  # width of edge embeddings (edges are as many as weights)
    num_layers: int = 1  # message-passing layers
    head_hidden: int = 8  # hidden width of the per-edge and per-slot heads
    step_scale: float = 1e-3  # b: base step, the Adam-equivalent learning rate
    magnitude_scale: float = 1.0  # a: how strongly m rescales the step
    magnitude_clip: float = 4.0  # |a * m| is soft-clipped to this (a factor e^4)
    # Give nodes log(1 + fan-in) and log(1 + fan-out) (scaled by 1/10): mean
    # aggregation hides how many edges a node has, and with it the layer width.
    degree_features: bool = False
    # Per-edge work, the cost of a step (see lopt/optim/fused/dense.py): edge updates
    # through a per-edge MLP or by adding node projections only, and the edge
    # head's hidden width (None: head_hidden; 0: a linear head on the edge
    # embedding, plus the skip path from the features).
    edge_mlp: bool = True
    edge_head_hidden: int | None = None

    @property
    def edge_hidden(self) -> int:
        """Hidden width of the per-edge head."""
        if self.edge_head_hidden is None:
            return self.head_hidden
        return self.edge_head_hidden

    @property
    def node_in_dim(self) -> int:
        """Width of the node inputs of the backbone."""
        return NODE_IN_DIM + (NUM_DEGREE_FEATURES if self.degree_features else 0)

    def __post_init__(self):
        for name in ("node_dim", "edge_dim", "num_layers", "head_hidden"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < (0 if name == "num_layers" else 1):
                raise ValueError(f"Invalid {name}: {value}")
        for name in ("degree_features", "edge_mlp"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"Invalid {name}: {getattr(self, name)!r}")
        hidden = self.edge_head_hidden
        if hidden is not None and (
            isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 0
        ):
            raise ValueError(f"Invalid edge_head_hidden: {hidden!r}")
        for name in ("step_scale", "magnitude_scale", "magnitude_clip"):
            value = getattr(self, name)
            if not (
                isinstance(value, (int, float)) and math.isfinite(value) and value > 0
            ):
                raise ValueError(f"Invalid {name}: {value}")


class _Head(nn.Module):
    """MLP on ``[embedding, own features]`` plus a linear skip from the features,
    outputting ``(direction, log-magnitude)``. Channel-major: ``(C, n)``.
    ``hidden=0``: a linear map of the embedding instead of the MLP."""

    def __init__(self, embed_dim: int, hidden: int):
        super().__init__()
        self.hidden = hidden
        if hidden:
            self.embed_in = nn.Linear(embed_dim, hidden)
            self.feat_in = nn.Linear(NUM_FEATURES, hidden, bias=False)
        self.out = nn.Linear(hidden or embed_dim, 2)
        self.skip = nn.Linear(NUM_FEATURES, 2, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.hidden:
            self.embed_in.reset_parameters()
            self.feat_in.reset_parameters()
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        with torch.no_grad():
            self.skip.weight.copy_(self.adam_skip())

    def adam_skip(self) -> torch.Tensor:
        """The skip weights of a fresh head: its direction is the Adam ratio
        and its log-magnitude zero."""
        weight = torch.zeros_like(self.skip.weight)
        weight[0, ADAM_RATIO_FEATURE] = 1.0
        return weight

    def forward(self, embed: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        if not self.hidden:
            return channel_linear(self.out, embed).addmm_(self.skip.weight, feats)
        # The feature parts accumulate into the products' fresh outputs
        # (addmm_ does not need its output for backward): no temporaries.
        hidden = channel_linear(self.embed_in, embed).addmm_(self.feat_in.weight, feats)
        # silu's backward needs its input: in place only without autograd.
        act = nn.functional.silu(hidden, inplace=not torch.is_grad_enabled())
        return channel_linear(self.out, act).addmm_(self.skip.weight, feats)


class UpdateRule(nn.Module):
    """Graph backbone plus heads: predicts one update per scalar parameter.

    Args:
        config (RuleConfig, optional): widths and output constants.
        step_size (StepSizeConfig, optional): the per-tensor step-size
            controller the rule's updates are scaled by (default: off).

    Shapes:
        - **input:** a :class:`~lopt.graph.NeuralGraph` with ``P`` scalars,
          features :math:`(F, P)` in graph order, time features :math:`(T,)`
        - **output:** updates :math:`(P,)` in graph order
    """

    def __init__(
        self, config: RuleConfig | None = None, step_size: StepSizeConfig | None = None
    ):
        super().__init__()
        self.config = config or RuleConfig()
        self.step_size = step_size or StepSizeConfig()
        c = self.config
        self.backbone = GraphBackbone(
            c.node_in_dim, EDGE_IN_DIM, c.node_dim, c.edge_dim, c.num_layers, c.edge_mlp
        )
        self.edge_head = _Head(c.edge_dim, c.edge_hidden)
        self.slot_head = _Head(c.node_dim + NUM_SLOT_TYPES, c.head_hidden)
        self.metadata: dict[str, Any] = {}

    def node_inputs(
        self, graph: NeuralGraph, slot_feats: torch.Tensor, time: torch.Tensor
    ) -> torch.Tensor:
        """Static node attributes, time, and the features of each node's slots
        (one block per slot type, plus an indicator), and with
        ``degree_features`` the scaled log fan-in and fan-out,
        ``(N, config.node_in_dim)``."""
        n = graph.num_nodes
        like = {"device": slot_feats.device, "dtype": slot_feats.dtype}
        index = graph.slot_node * NUM_SLOT_TYPES + graph.slot_type
        ones = torch.ones(1, len(index), **like)
        slots = torch.zeros(NUM_FEATURES + 1, n * NUM_SLOT_TYPES, **like)
        slots = slots.index_add(1, index, torch.cat([slot_feats, ones], dim=0))
        slots = slots.view(NUM_FEATURES + 1, n, NUM_SLOT_TYPES).permute(1, 2, 0)
        parts = [graph.node_attr, time.expand(n, -1), slots.reshape(n, -1)]
        if self.config.degree_features:
            parts.append(graph.log_degree.to(slot_feats.dtype) / DEGREE_SCALE)
        return torch.cat(parts, dim=1)

    def forward(
        self, graph: NeuralGraph, feats: torch.Tensor, time: torch.Tensor
    ) -> torch.Tensor:
        edge_feats, slot_feats = graph.split_scalars(feats)
        x = self.node_inputs(graph, slot_feats, time)
        # Without multi-tap kernels the static edge attributes are all zero and
        # are left out (the encoder treats omitted trailing inputs as zeros).
        blocks = (
            (edge_feats,)
            if graph.kernel_attr is None
            else (edge_feats, graph.kernel_attr)
        )
        h, e = self.backbone(x, graph.edge_index, blocks, graph.degree)
        slot_type = nn.functional.one_hot(graph.slot_type, NUM_SLOT_TYPES).to(h.dtype)
        slot_embed = torch.cat([h[graph.slot_node], slot_type], dim=1).T
        out = torch.cat(
            [self.edge_head(e, edge_feats), self.slot_head(slot_embed, slot_feats)],
            dim=1,
        )
        return self._to_update(out[0], out[1])

    @property
    def learned_output_is_zero(self) -> bool:
        """Whether the learned path adds nothing: both heads' output layers
        are zero and their skip paths are still the Adam ratio, as in a fresh
        rule. The update is then ``-step_scale`` times the Adam ratio
        (beta1 = 0.9) whatever the graph network computes, and
        :func:`~lopt.optim.functional.ng_step` skips it (without autograd).

        Checked once per version of the heads' weights (their storage and
        in-place version counters), so a step pays nothing for it and never
        waits on a device."""
        tensors = [
            t
            for head in (self.edge_head, self.slot_head)
            for t in (head.out.weight, head.out.bias, head.skip.weight)
        ]
        key = tuple((t.data_ptr(), t._version) for t in tensors)
        cached = self.__dict__.get("_zero_output")
        if cached is not None and cached[0] == key:
            return cached[1]
        with torch.no_grad():
            zero = True
            for head in (self.edge_head, self.slot_head):
                want = head.adam_skip()
                if (
                    head.out.weight.any()
                    or head.out.bias.any()
                    or not torch.equal(head.skip.weight, want)
                ):
                    zero = False
        self.__dict__["_zero_output"] = (key, bool(zero))
        return bool(zero)

    def _to_update(
        self, direction: torch.Tensor, magnitude: torch.Tensor
    ) -> torch.Tensor:
        """The update from the heads' outputs; without autograd it overwrites
        ``direction`` and ``magnitude`` (rows of :meth:`forward`'s own
        buffer) with the same operations in place."""
        c = self.config
        clip = c.magnitude_clip
        if torch.is_grad_enabled():
            log_scale = clip * torch.tanh(c.magnitude_scale * magnitude / clip)
            return -c.step_scale * direction * torch.exp(log_scale)
        log_scale = magnitude.mul_(c.magnitude_scale).div_(clip).tanh_().mul_(clip)
        return direction.mul_(-c.step_scale).mul_(log_scale.exp_())

    def extra_repr(self) -> str:
        if not self.step_size.enabled:
            return f"config={self.config}"
        return f"config={self.config}, step_size={self.step_size}"


# --------------------------------------------------------------------- files
def _feature_spec() -> dict[str, Any]:
    return {
        "names": list(FEATURE_NAMES),
        "momentum_decays": list(MOMENTUM_DECAYS),
        "time_scales": list(TIME_SCALES),
    }


def blend_with_untrained(rule: UpdateRule, alpha: float) -> UpdateRule:
    """A copy of ``rule`` whose heads output ``alpha`` times its own
    direction and log-magnitude plus ``1 - alpha`` times a fresh rule's
    (the Adam ratio and zero): the learned corrections shrunk towards the
    untrained rule, exactly, because both heads are linear in their output
    and skip weights. ``alpha = 1`` is ``rule``, ``0`` its untrained
    ablation (whose step skips the graph network). The backbone, the
    config and the step-size controller are kept.

    Raises:
        ValueError: ``alpha`` outside ``[0, 1]``.
    """
    if not (isinstance(alpha, (int, float)) and 0.0 <= alpha <= 1.0):
        raise ValueError(f"Invalid alpha: {alpha!r} (need 0 <= alpha <= 1)")
    out = UpdateRule(rule.config, rule.step_size)
    out.load_state_dict(rule.state_dict())
    out.metadata = dict(rule.metadata)
    with torch.no_grad():
        for head in (out.edge_head, out.slot_head):
            head.out.weight.mul_(alpha)
            head.out.bias.mul_(alpha)
            head.skip.weight.mul_(alpha).add_(head.adam_skip(), alpha=1.0 - alpha)
    return out


def save_rule(
    rule: UpdateRule, path: str | os.PathLike, provenance: dict[str, Any] | None = None
) -> Path:
    """Save ``rule`` to directory ``path`` (created if needed).

    Writes ``weights.safetensors`` and ``config.json``, which records the
    SHA-256 of the weights file so that loading detects damaged values; each
    file is written to
    a temporary name and renamed, so an interrupted save never leaves a
    half-written file in place of a good one.

    Args:
        rule: the rule to save.
        path: target directory.
        provenance: JSON-serialisable facts about how the rule was made
            (command, meta-training config, commit, validation scores). Merged
            over ``rule.metadata``.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    meta = {**rule.metadata, **(provenance or {})}
    config = {
        "format": _FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "rule_config": asdict(rule.config),
        "step_size": asdict(rule.step_size),
        "features": _feature_spec(),
        "provenance": meta,
    }
    tensors = {k: v.detach().cpu().contiguous() for k, v in rule.state_dict().items()}
    with tempfile.TemporaryDirectory(dir=path) as tmp:
        save_file(tensors, os.path.join(tmp, WEIGHTS_FILE))
        config["weights_sha256"] = _sha256(Path(tmp, WEIGHTS_FILE).read_bytes())
        Path(tmp, CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
        os.replace(os.path.join(tmp, WEIGHTS_FILE), path / WEIGHTS_FILE)
        os.replace(os.path.join(tmp, CONFIG_FILE), path / CONFIG_FILE)
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        # Files made inside a TemporaryDirectory may be private (0600); a rule is
        # read by whoever runs the optimizer.
        os.chmod(path / name, 0o644)
    return path


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(
            f"Rule config {path / CONFIG_FILE} is not valid JSON: {err}"
        ) from err
    if not isinstance(config, dict) or config.get("format") != _FORMAT_NAME:
        raise ValueError(f"{path / CONFIG_FILE} is not an lopt rule config")
    version = config.get("format_version")
    if version not in _READABLE_VERSIONS:
        raise ValueError(
            f"Rule {path} has format version {version!r}; this lopt reads "
            f"versions {list(_READABLE_VERSIONS)}"
        )
    if config.get("features") != _feature_spec():
        raise ValueError(
            f"Rule {path} was trained on features {config.get('features')}, but this "
            f"lopt computes {_feature_spec()}"
        )
    return config


def _configs(path: Path, config: dict[str, Any]) -> tuple[RuleConfig, StepSizeConfig]:
    """The rule's architecture and its step-size controller from a config
    file's contents (before version 3 the controller's settings were
    ``step_adapt_*`` fields of ``rule_config``)."""
    try:
        fields = config["rule_config"]
        if not isinstance(fields, dict):
            raise TypeError(f"rule_config is {type(fields).__name__}, not an object")
        old = sorted(k for k in fields if k in LEGACY_FIELDS)
        fields, legacy = split_legacy_fields(fields)
        if config["format_version"] >= 3:
            if old:
                raise TypeError(f"step-size fields {old} belong in step_size")
            legacy = config["step_size"]
        return RuleConfig(**fields), StepSizeConfig(**legacy)
    except (TypeError, KeyError) as err:
        raise ValueError(f"Rule {path} has an invalid rule_config: {err}") from err


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _verify_checksum(path: Path, config: dict[str, Any], data: bytes) -> None:
    """Compare the weights file's bytes with the checksum its config records."""
    expected = config.get("weights_sha256")
    if config["format_version"] == 1:
        warnings.warn(
            f"Rule {path} has format version 1, which records no checksum of its "
            "weights, so damaged values cannot be detected; re-save it with "
            "lopt.save_rule to add one",
            UserWarning,
            stacklevel=3,
        )
        return
    if not isinstance(expected, str):
        raise ValueError(
            f"Rule config {path / CONFIG_FILE} has no weights_sha256 checksum"
        )
    actual = _sha256(data)
    if actual != expected:
        raise ValueError(
            f"Rule weights {path / WEIGHTS_FILE} are corrupted: their SHA-256 is "
            f"{actual}, but {CONFIG_FILE} records {expected}"
        )


def load_rule(path: str | os.PathLike) -> UpdateRule:
    """Load a rule saved by :func:`save_rule` from its directory.

    Raises:
        FileNotFoundError: ``path`` or one of its two files does not exist.
        ValueError: a file is corrupted (the weights do not match the
            checksum in the config), of another format version, or does not
            match the architecture its config describes.
    """
    path = Path(path)
    if path.is_file() and path.name in (CONFIG_FILE, WEIGHTS_FILE):
        path = path.parent
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (path / name).is_file():
            raise FileNotFoundError(f"No rule at {path}: missing {name}")
    config = _read_config(path)
    rule_config, step_size = _configs(path, config)
    data = (path / WEIGHTS_FILE).read_bytes()
    _verify_checksum(path, config, data)
    try:
        tensors = load_safetensors(data)
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(
            f"Rule weights {path / WEIGHTS_FILE} are corrupted: {err}"
        ) from err
    # Initialising the modules draws from torch's global generator; the values
    # are overwritten below, and loading a rule must not change the random
    # stream of the user's program (dropout masks, data order).
    with torch.random.fork_rng(devices=[]):
        rule = UpdateRule(rule_config, step_size)
    expected = rule.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"Rule weights {path / WEIGHTS_FILE} do not match its config: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for name, value in tensors.items():
        if value.shape != expected[name].shape:
            raise ValueError(
                f"Rule weights {path / WEIGHTS_FILE}: {name} has shape "
                f"{tuple(value.shape)}, config expects {tuple(expected[name].shape)}"
            )
        if not torch.isfinite(value).all():
            raise ValueError(
                f"Rule weights {path / WEIGHTS_FILE}: {name} is not finite"
            )
    rule.load_state_dict(tensors)
    rule.metadata = dict(config.get("provenance") or {})
    return rule
