"""Baselines for the weight-space tasks, as predictors of the same harness
(:class:`~lopt.weightspace.training.WeightSpaceTrainer`): same splits, same
views, same selection on validation.

* :class:`FlatWeightsMLP`: an MLP on the flattened weights, optionally with
  permutation augmentation (:func:`permute_hidden` per network and step).
* :class:`StatNN` / :class:`StatNNTrees`: per-layer weight statistics
  (Unterthiner et al. 2020: mean, variance and five quantiles of every weight,
  bias and norm tensor, :func:`weight_statistics`) into an MLP or
  scikit-learn's gradient-boosted trees.
* :class:`NFNPredictor`: neural functional networks (Zhou et al. 2023, the
  ``nfn`` package: NP / HNP equivariant layers) for a fixed architecture.
* :class:`ProbePredictor`: an MLP on an INR's outputs at fixed random inputs.
* :class:`ImagePredictor`: an MLP on the signal an INR was fitted to
  (``data.extras["image"]``), the reference ceiling of INR classification.

Flat, NFN and probe predictors need one architecture for all networks (the
fixed-architecture zoos); statistics work on any mix of architectures.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.func import functional_call, vmap

from lopt.weightspace.baselines.nfn import NFNPredictor
from lopt.weightspace.baselines.permutations import chain_layers, permute_hidden
from lopt.weightspace.baselines.trees import TreeEnsemble
from lopt.weightspace.models.features import (
    STATISTICS_SCALINGS,
    adopt_buffer_shapes,
    quantile_scale,
)
from lopt.weightspace.splits import WeightSpaceData

__all__ = [
    "mlp",
    "chain_layers",
    "permute_hidden",
    "weight_statistics",
    "FeaturePredictor",
    "FlatWeightsMLP",
    "StatNN",
    "StatNNTrees",
    "NFNPredictor",
    "ProbePredictor",
    "ImagePredictor",
    "TreeEnsemble",
]

_QUANTILES = (0.0, 0.25, 0.5, 0.75, 1.0)
#: Tensors of a layer that :func:`weight_statistics` describes, in order.
_SLOTS = ("weight", "bias", "norm_weight", "norm_bias")


def mlp(in_dim: int, hidden: int, out_dim: int, layers: int = 2, dropout: float = 0.0):
    """``layers`` hidden ReLU layers of width ``hidden``, then a linear map."""
    mods: list[nn.Module] = []
    width = in_dim
    for _ in range(layers):
        mods += [nn.Linear(width, hidden), nn.ReLU()]
        if dropout:
            mods.append(nn.Dropout(dropout))
        width = hidden
    mods.append(nn.Linear(width, out_dim))
    return nn.Sequential(*mods)


#: StatNN features are clamped to this magnitude: a diverged network's
#: weights (1e20) have a variance beyond float32, and one infinite feature
#: would make a whole standardised column NaN.
_FEATURE_LIMIT = 1e30


def _stats(tensor: torch.Tensor) -> torch.Tensor:
    flat = tensor.detach().reshape(-1).double()
    q = torch.quantile(flat, torch.tensor(_QUANTILES, dtype=flat.dtype))
    var = flat.var() if flat.numel() > 1 else flat.new_zeros(())
    out = torch.cat([flat.mean()[None], var[None], q])
    return out.clamp(-_FEATURE_LIMIT, _FEATURE_LIMIT).float()


def weight_statistics(
    state: dict[str, torch.Tensor],
    per_layer: int | None = None,
    module: nn.Module | None = None,
) -> torch.Tensor:
    """StatNN features of one network: for each layer (:func:`chain_layers`)
    the mean, variance and quantiles (0, .25, .5, .75, 1) of its weight, bias,
    norm scale and norm shift (zeros where absent).

    Args:
        state: the network's state_dict.
        per_layer: with the number of layers of the network, one block per
            layer; ``None`` for networks of varying depth: blocks for the
            first layer, the mean of the middle layers, the last layer and the
            mean of shortcut layers, then the number of layers.
        module: the network's architecture: layers are then grouped in the
            order its traced forward runs them (:func:`chain_layers`), not
            in registration order.

    Returns:
        ``(per_layer * 28,)`` or ``(4 * 28 + 1,)``.

    Raises:
        ValueError: ``per_layer`` differs from the network's depth.
    """
    layers = chain_layers(state, module)
    plain = [layer for layer in layers if "shortcut" not in layer]
    width = len(_SLOTS) * (2 + len(_QUANTILES))

    def block(layer: dict[str, str]) -> torch.Tensor:
        parts = [
            _stats(state[layer[s]]) if s in layer else torch.zeros(width // 4)
            for s in _SLOTS
        ]
        return torch.cat(parts)

    def mean_block(group: list[dict[str, str]]) -> torch.Tensor:
        if not group:
            return torch.zeros(width)
        return torch.stack([block(layer) for layer in group]).mean(0)

    if per_layer is not None:
        if len(plain) != per_layer:
            raise ValueError(
                f"the network has {len(plain)} layers, the features expect {per_layer}"
            )
        return torch.cat([block(layer) for layer in plain])
    shortcuts = [
        {"weight": layer["shortcut"]} for layer in layers if "shortcut" in layer
    ]
    return torch.cat(
        [
            block(plain[0]),
            mean_block(plain[1:-1]),
            block(plain[-1]),
            mean_block(shortcuts),
            torch.tensor([float(len(plain))]),
        ]
    )


class FeaturePredictor(nn.Module):
    """Base of the baselines that read a feature vector per network: inputs
    are standardised with the training split's statistics (fitted in
    :meth:`prepare`), then an MLP.

    Subclasses define ``features(data, index) -> (B, F)``. For editing, the
    MLP's output is a flat delta of every parameter, unflattened in the
    networks' state_dict shapes.

    The MLP is built by :meth:`prepare`, when its input width is known; a
    fresh predictor builds it from a fitted one's state_dict instead, so
    ``fresh.load_state_dict(fitted.state_dict())`` works (for editing, the
    delta shapes come from :meth:`restore_fitted`).

    Args:
        out_dim (int): outputs (classes, 1 for regression; ignored for
            editing, which outputs one value per parameter).
        hidden (int, optional): MLP width. (default: ``128``)
        layers (int, optional): MLP hidden layers. (default: ``2``)
        dropout (float, optional): MLP dropout. (default: ``0.0``)
    """

    def __init__(
        self, out_dim: int, hidden: int = 128, layers: int = 2, dropout: float = 0.0
    ):
        super().__init__()
        self.out_dim, self.hidden, self.layers, self.dropout = (
            out_dim,
            hidden,
            layers,
            dropout,
        )
        self.task = "classification"
        self.generator: torch.Generator | None = None
        self.head: nn.Module | None = None
        self.register_buffer("mean", torch.zeros(0))
        self.register_buffer("std", torch.ones(0))
        self._shapes: dict[str, torch.Size] = {}
        self._cache: dict[int, tuple[WeightSpaceData, torch.Tensor]] = {}

    #: Whether features depend on the step (augmentation): then never cached.
    cacheable = True

    def features(self, data: WeightSpaceData, index: Sequence[int]) -> torch.Tensor:
        raise NotImplementedError

    def _normaliser(self, feats: torch.Tensor):
        # In float64: squares of features up to 1e30 overflow float32.
        wide = feats.double()
        std = wide.std(0).clamp(min=1e-6) if len(feats) > 1 else wide[0] * 0 + 1
        return wide.mean(0).to(feats.dtype), std.to(feats.dtype)

    def all_features(self, data: WeightSpaceData) -> torch.Tensor:
        """``features`` of every network of ``data``, computed once per
        split object and kept while the predictor lives."""
        hit = self._cache.get(id(data))
        if hit is not None and hit[0] is data:
            return hit[1]
        with torch.no_grad():
            feats = torch.cat(
                [
                    self.features(data, list(range(s, min(s + 256, len(data)))))
                    for s in range(0, len(data), 256)
                ]
            )
        self._cache[id(data)] = (data, feats)
        return feats

    def prepare(self, train: WeightSpaceData) -> None:
        """Fit the standardisation on ``train`` and build the MLP (its input
        width is known only now)."""
        feats = self.all_features(train)
        self.mean, self.std = self._normaliser(feats)
        out = self.out_dim
        if self.task == "editing":
            state = train.state_dicts[0]
            self._shapes = {k: v.shape for k, v in state.items()}
            out = sum(v.numel() for v in state.values())
        self.head = mlp(feats.shape[1], self.hidden, out, self.layers, self.dropout)

    def reset_parameters(self) -> None:
        if self.head is not None:
            for module in self.head.modules():
                if isinstance(module, nn.Linear):
                    module.reset_parameters()

    #: Buffers whose size fitting sets (see :meth:`_load_from_state_dict`).
    _FITTED: tuple[str, ...] = ("mean", "std")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Fitting sizes the MLP and the standardisation: a fresh predictor
        # takes both from the state_dict (the MLP's widths from its weights).
        adopt_buffer_shapes(self, state_dict, prefix, self._FITTED)
        first = state_dict.get(f"{prefix}head.0.weight")
        if self.head is None and isinstance(first, torch.Tensor):
            linear = sorted(
                int(k[len(prefix) :].split(".")[1])
                for k in state_dict
                if k.startswith(f"{prefix}head.") and k.endswith(".weight")
            )
            out = state_dict[f"{prefix}head.{linear[-1]}.weight"].shape[0]
            self.head = mlp(first.shape[1], self.hidden, out, self.layers, self.dropout)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def get_config(self) -> dict:
        """The constructor's arguments, JSON-safe (for saving)."""
        return {
            "out_dim": self.out_dim,
            "hidden": self.hidden,
            "layers": self.layers,
            "dropout": self.dropout,
        }

    def fitted_config(self) -> dict:
        """What fitting set that is not a tensor, JSON-safe: for editing, the
        shape of each parameter's delta."""
        return {"shapes": {k: list(v) for k, v in self._shapes.items()}}

    def restore_fitted(self, fitted: dict) -> None:
        """Undo :meth:`fitted_config` on a fresh predictor, before its
        ``load_state_dict``."""
        self._shapes = {k: torch.Size(v) for k, v in fitted.get("shapes", {}).items()}

    def collate(self, data: WeightSpaceData, index: Sequence[int]) -> torch.Tensor:
        if self.head is None:
            raise RuntimeError(f"{type(self).__name__}: call prepare(train) first")
        if self.cacheable and not (getattr(self, "augment", False) and self.training):
            feats = self.all_features(data)[torch.as_tensor(list(index))]
        else:
            feats = self.features(data, index)
        return (feats - self.mean) / self.std

    def forward(self, x: torch.Tensor):
        out = self.head(x)
        if self.task != "editing":
            return out
        deltas, start = {}, 0
        for key, shape in self._shapes.items():
            deltas[key] = out[:, start : start + shape.numel()].reshape(-1, *shape)
            start += shape.numel()
        return deltas

    def extra_repr(self) -> str:
        return f"out_dim={self.out_dim}, hidden={self.hidden}, layers={self.layers}"


class FlatWeightsMLP(FeaturePredictor):
    """An MLP on every weight and bias, flattened in state_dict order.

    With ``augment=True`` each training network's hidden neurons are randomly
    permuted (:func:`permute_hidden`) every time it is drawn; the function
    it computes is unchanged, only its position in weight space moves.
    Standardisation is per tensor (one mean and std per weight matrix), so it
    commutes with those permutations.

    Args:
        out_dim (int): see :class:`FeaturePredictor`.
        augment (bool, optional): permutation augmentation. (default: ``False``)
        **kwargs: MLP settings of :class:`FeaturePredictor`.
    """

    def __init__(self, out_dim: int, augment: bool = False, **kwargs):
        super().__init__(out_dim, **kwargs)
        self.augment = augment
        self._sizes: list[int] = []

    def features(self, data, index):
        states = [data.state_dicts[i] for i in index]
        if self.augment and self.training:
            states = [permute_hidden(s, self.generator) for s in states]
        keys = list(states[0])
        for i, s in zip(index, states):
            if list(s) != keys:
                raise ValueError(
                    f"network {i} has another architecture; FlatWeightsMLP needs one"
                )
        return torch.stack(
            [torch.cat([s[k].reshape(-1) for k in keys]) for s in states]
        ).float()

    def prepare(self, train):
        state = train.state_dicts[0]
        self._sizes = [v.numel() for v in state.values()]
        super().prepare(train)

    def _normaliser(self, feats):
        means, stds = [], []
        for part in feats.split(self._sizes, dim=1):
            std = part.std() if part.numel() > 1 else part.new_ones(())
            means.append(part.mean().expand(part.shape[1]))
            stds.append(std.clamp(min=1e-6).expand(part.shape[1]))
        return torch.cat(means), torch.cat(stds)

    def get_config(self) -> dict:
        return {**super().get_config(), "augment": self.augment}

    def extra_repr(self) -> str:
        return super().extra_repr() + f", augment={self.augment}"


class StatNN(FeaturePredictor):
    """StatNN (Unterthiner et al. 2020) with an MLP: :func:`weight_statistics`
    of each network, per layer when every training network has the same
    depth, else first / middle / last / shortcut blocks and the depth. Layers
    are grouped in the order each network's traced forward runs them, so a
    norm kept in a separate ``ModuleList`` joins the layer it follows.

    Args:
        out_dim (int): classes (classification) or 1.
        scaling (str, optional): ``"standard"`` (standardised inputs) or
            ``"quantile"`` (each feature then mapped through its quantiles on
            the training networks,
            :func:`~lopt.weightspace.models.features.quantile_scale`:
            robust to the heavy tails of weight statistics). (default:
            ``"standard"``)
        **kwargs: the MLP's (:class:`FeaturePredictor`).
    """

    def __init__(self, out_dim: int, scaling: str = "standard", **kwargs):
        super().__init__(out_dim, **kwargs)
        if scaling not in STATISTICS_SCALINGS:
            raise ValueError(
                f"Invalid scaling: {scaling!r} (expected one of {STATISTICS_SCALINGS})"
            )
        self.scaling = scaling
        # The training networks' depth (per-layer features), -1: mixed depths.
        self.register_buffer("layer_count", torch.tensor(-1))
        self.register_buffer("knots", torch.zeros(0))

    _FITTED = ("mean", "std", "knots")

    @property
    def per_layer(self) -> int | None:
        """The depth all training networks share (one feature block per
        layer), or ``None`` (first / middle / last / shortcut blocks)."""
        count = int(self.layer_count)
        return None if count < 0 else count

    @per_layer.setter
    def per_layer(self, value: int | None) -> None:
        self.layer_count.fill_(-1 if value is None else value)

    def features(self, data, index):
        return torch.stack(
            [
                weight_statistics(data.state_dicts[i], self.per_layer, data.modules[i])
                for i in index
            ]
        )

    def prepare(self, train):
        depths = {
            sum("shortcut" not in layer for layer in chain_layers(s, m))
            for s, m in zip(train.state_dicts, train.modules)
        }
        self.per_layer = depths.pop() if len(depths) == 1 else None
        super().prepare(train)
        if self.scaling == "quantile":
            standard = (self.all_features(train) - self.mean) / self.std
            self.knots = torch.quantile(standard, torch.linspace(0, 1, 101), dim=0)

    def collate(self, data, index):
        feats = super().collate(data, index)
        return quantile_scale(feats, self.knots) if len(self.knots) else feats

    def get_config(self) -> dict:
        return {**super().get_config(), "scaling": self.scaling}

    def extra_repr(self) -> str:
        return super().extra_repr() + f", scaling={self.scaling!r}"


class StatNNTrees(StatNN):
    """StatNN with scikit-learn's histogram gradient-boosted trees (the
    original's choice) instead of an MLP; fitted in one call by the harness.

    scikit-learn fits the trees; their nodes are then copied into a
    :class:`~lopt.weightspace.baselines.trees.TreeEnsemble` (``.trees``),
    which predicts in torch and saves in the state_dict like any tensor.

    Args:
        out_dim (int): classes (classification) or 1.
        max_iter (int, optional): boosting iterations. (default: ``200``)
        learning_rate (float, optional): shrinkage. (default: ``0.1``)
    """

    def __init__(self, out_dim: int, max_iter: int = 200, learning_rate: float = 0.1):
        super().__init__(out_dim)
        self.max_iter, self.learning_rate = max_iter, learning_rate
        self.trees = TreeEnsemble()

    def fit_direct(self, train: WeightSpaceData, task: str, seed: int = 0) -> None:
        from sklearn.ensemble import (
            HistGradientBoostingClassifier,
            HistGradientBoostingRegressor,
        )

        if task == "editing":
            raise ValueError("StatNNTrees predicts graph-level labels, not edits")
        x = self.collate(train, list(range(len(train)))).numpy()
        kwargs = dict(
            max_iter=self.max_iter, learning_rate=self.learning_rate, random_state=seed
        )
        if task == "classification":
            fitted = HistGradientBoostingClassifier(**kwargs).fit(x, train.y.numpy())
        else:
            y = train.y.float()
            std = float(y.std()) if len(y) > 1 and float(y.std()) > 0 else 1.0
            fitted = HistGradientBoostingRegressor(**kwargs).fit(
                x, ((y - y.mean()) / std).numpy()
            )
        self.trees.load_sklearn(fitted)

    def predict_direct(
        self, data: WeightSpaceData, index: Sequence[int]
    ) -> torch.Tensor:
        out = self.trees(self.collate(data, index)).float()
        if self.task != "classification":
            return out[:, None]
        classes = self.trees.classes
        full = out.new_zeros(len(index), max(self.out_dim, int(classes.max()) + 1))
        full[:, classes] = out
        return full

    def forward(self, x):
        raise RuntimeError("StatNNTrees is fitted by fit_direct, not by gradients")

    def get_config(self) -> dict:
        return {
            "out_dim": self.out_dim,
            "max_iter": self.max_iter,
            "learning_rate": self.learning_rate,
        }


class ProbePredictor(FeaturePredictor):
    """An MLP on a network's outputs at ``num_probes`` fixed random inputs,
    uniform in ``[-1, 1]^input_dim`` (an INR's coordinate range).

    Args:
        out_dim (int): see :class:`FeaturePredictor`.
        num_probes (int): number of inputs.
        input_dim (int): the networks' input width (2 for images, 1 for
            signals).
        seed (int, optional): seed of the inputs. (default: ``0``)
    """

    def __init__(
        self, out_dim: int, num_probes: int, input_dim: int, seed: int = 0, **kwargs
    ):
        super().__init__(out_dim, **kwargs)
        self.num_probes, self.input_dim, self.seed = num_probes, input_dim, seed
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer(
            "probe_inputs", torch.rand(num_probes, input_dim, generator=gen) * 2 - 1
        )

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "num_probes": self.num_probes,
            "input_dim": self.input_dim,
            "seed": self.seed,
        }

    def features(self, data, index):
        params = data.stacked_state(index)
        module = data.modules[index[0]]
        probes = self.probe_inputs

        def run(p):
            return functional_call(module, p, (probes,)).reshape(-1)

        with torch.no_grad():
            return vmap(run)(params)


class ImagePredictor(FeaturePredictor):
    """An MLP on ``data.extras["image"]``: the signal each INR represents
    (a classifier on the data itself, not on weights)."""

    def features(self, data, index):
        if "image" not in data.extras:
            raise ValueError("ImagePredictor needs data.extras['image']")
        return (
            data.extras["image"][torch.as_tensor(list(index))]
            .reshape(len(index), -1)
            .float()
        )
