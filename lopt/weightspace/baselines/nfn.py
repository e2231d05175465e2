"""NFN (Zhou et al. 2023) as a predictor of the weight-space harness, from
the ``nfn`` package (imported when a model is prepared)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lopt.weightspace.baselines.permutations import chain_layers
from lopt.weightspace.splits import WeightSpaceData

__all__ = ["NFNPredictor"]


def _mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, out_dim)
    )


class NFNPredictor(nn.Module):
    """Neural functional network (Zhou et al. 2023) from the ``nfn`` package.

    ``layers`` equivariant layers (``HNPLinear``: hidden neurons permutable,
    input and output neurons fixed, or ``NPLinear``: all permutable) with
    ReLU; graph-level tasks pool invariantly (``HNPPool`` / ``NPPool``) into
    an MLP, editing maps to one channel: a delta per weight and bias. Each
    weight and bias tensor is divided by its standard deviation over the
    training split (one scalar per tensor, so equivariance is kept).

    Args:
        out_dim (int): outputs of graph-level tasks.
        hidden (int, optional): channels. (default: ``32``)
        layers (int, optional): equivariant layers. (default: ``3``)
        mode (str, optional): ``"HNP"`` or ``"NP"``. (default: ``"HNP"``)
        head_hidden (int, optional): width of the pooled MLP. (default: ``128``)
    """

    def __init__(
        self,
        out_dim: int,
        hidden: int = 32,
        layers: int = 3,
        mode: str = "HNP",
        head_hidden: int = 128,
    ):
        super().__init__()
        if mode not in ("HNP", "NP"):
            raise ValueError(f"Invalid mode: {mode!r} (expected 'HNP' or 'NP')")
        self.out_dim, self.hidden, self.num_layers, self.mode = (
            out_dim,
            hidden,
            layers,
            mode,
        )
        self.head_hidden = head_hidden
        self.task = "classification"
        self.spec = None
        self.keys: list[str] = []
        self.net: nn.Module | None = None
        self.scales: list[float] = []

    def _wsfeat(self, state: dict[str, torch.Tensor]):
        from nfn.common import WeightSpaceFeatures

        weights, biases = [], []
        for layer in self._layers:
            weights.append(state[layer["weight"]][:, None].float())
            biases.append(state[layer["bias"]][:, None].float())
        return WeightSpaceFeatures(weights, biases)

    def prepare(self, train: WeightSpaceData) -> None:
        """Read the architecture from ``train`` and build the layers."""
        layers = chain_layers(train.state_dicts[0])
        for layer in layers:
            if set(layer) - {"prefix"} != {"weight", "bias"}:
                raise ValueError(
                    "NFNPredictor handles chains of weight + bias layers only "
                    f"(no norms, shortcuts or bias-free layers), got {layer}"
                )
        sample = train.stacked_state(list(range(min(len(train), 512))))
        self._build(
            layers,
            {k: list(v.shape[1:]) for k, v in sample.items()},
            [float(v.float().std().clamp(min=1e-6)) for v in sample.values()],
        )

    def _build(
        self,
        layers: list[dict[str, str]],
        shapes: dict[str, list[int]],
        scales: list[float],
    ) -> None:
        from nfn import layers as nfn_layers
        from nfn.common import network_spec_from_wsfeat

        self._layers, self.keys, self.scales = layers, list(shapes), scales
        self._param_shapes = {k: list(v) for k, v in shapes.items()}
        zeros = {k: torch.zeros(1, *shape) for k, shape in shapes.items()}
        self.spec = network_spec_from_wsfeat(self._wsfeat(zeros))
        equivariant = (
            nfn_layers.HNPLinear if self.mode == "HNP" else nfn_layers.NPLinear
        )
        pool = nfn_layers.HNPPool if self.mode == "HNP" else nfn_layers.NPPool
        mods: list[nn.Module] = []
        channels = 1
        for _ in range(self.num_layers):
            mods += [
                equivariant(self.spec, channels, self.hidden),
                nfn_layers.TupleOp(nn.ReLU()),
            ]
            channels = self.hidden
        if self.task == "editing":
            mods.append(equivariant(self.spec, channels, 1))
        else:
            mods += [
                pool(self.spec),
                nn.Flatten(start_dim=-2),
                _mlp(
                    pool.get_num_outs(self.spec) * channels,
                    self.head_hidden,
                    self.out_dim,
                ),
            ]
        self.net = nn.Sequential(*mods)

    def get_config(self) -> dict:
        """The constructor's arguments, JSON-safe (for saving)."""
        same = ("out_dim", "hidden", "mode", "head_hidden")
        return {"layers": self.num_layers, **{k: getattr(self, k) for k in same}}

    def fitted_config(self) -> dict:
        """The architecture :meth:`prepare` read: layers, shapes and the
        per-tensor scales, JSON-safe."""
        if self.net is None:
            raise RuntimeError("NFNPredictor: call prepare(train) first")
        return {
            "layers": self._layers,
            "shapes": self._param_shapes,
            "scales": self.scales,
        }

    def restore_fitted(self, fitted: dict) -> None:
        """Rebuild the layers of :meth:`fitted_config` on a fresh predictor,
        before its ``load_state_dict``."""
        self._build(fitted["layers"], fitted["shapes"], fitted["scales"])

    def collate(self, data: WeightSpaceData, index: Sequence[int]):
        if self.net is None:
            raise RuntimeError("NFNPredictor: call prepare(train) first")
        state = data.stacked_state(index)
        if list(state) != self.keys:
            raise ValueError(
                "NFNPredictor: networks of another architecture than train"
            )
        return {k: state[k] / s for k, s in zip(self.keys, self.scales)}

    def forward(self, state: dict[str, torch.Tensor]):
        out = self.net(self._wsfeat(state))
        if self.task != "editing":
            return out
        deltas = {}
        for layer, (w, b) in zip(self._layers, out):
            deltas[layer["weight"]] = w[:, 0]
            deltas[layer["bias"]] = b[:, 0]
        return {k: deltas[k] for k in self.keys}

    def extra_repr(self) -> str:
        return (
            f"out_dim={self.out_dim}, hidden={self.hidden}, "
            f"layers={self.num_layers}, mode={self.mode!r}"
        )
