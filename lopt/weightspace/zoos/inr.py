"""INR zoos: SIRENs fitted to digits images and mnist1d signals.

Each item (an 8x8 scikit-learn digit or a 40-sample mnist1d signal) is fitted
by ``views`` SIRENs from different random initialisations; the label is the
item's class. For digits, each SIREN also has a counterpart fitted to the
*dilated* image from the same initialisation (records ``target: "dilated"``
and ``pair``), the data of the paper's INR editing task: learn weights ->
dilated weights, or weights -> dilated image (``extra/target`` holds every
net's target image).

Many SIRENs train at once: ``torch.func.vmap`` over ``functional_call`` of one
module on the meta device, with the stacked parameters of the whole chunk and
one ``torch.optim.Adam`` over the stacks (Adam is elementwise and the loss is
a sum of per-net losses, so every net trains exactly as it would alone).
It is as fast as a hand-written stacked model (``einsum`` + ``baddbmm``), and
the trained weights are those of ``build_module(spec)`` by construction.

Fit quality (PSNR) of the presets, of the w0 and learning rates tried
before them, and fit times: ``docs/design-notes-code.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache, partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, vmap

from lopt.weightspace.zoos.specs import build_module, init_state_dict, normalize_spec
from lopt.weightspace.zoos.store import Chunk, ZooPlan, derive_seed, describe

__all__ = [
    "DIGITS_W0",
    "InrZooConfig",
    "PRESETS",
    "coordinates",
    "dilate",
    "fit_sirens",
    "plan_inr_zoo",
]


@dataclass(frozen=True)
class InrZooConfig:
    """How an INR zoo is built.

    Attributes:
        dataset: ``"digits"`` (8x8 scikit-learn digits) or ``"mnist1d"``.
        num_items: images / signals used, ``None`` for all (1,797 / 5,000).
        views: SIRENs per item, each from its own random initialisation.
        widths: SIREN layer widths; the first must be the coordinate
            dimension (2 or 1) and the last 1.
        w0: SIREN frequency factor (the digits presets use
            :data:`DIGITS_W0`, 8; mnist1d keeps 30).
        steps: full-batch Adam steps per SIREN.
        lr: Adam learning rate.
        resolution: digits only: images are fitted at ``resolution x
            resolution`` (8, or bilinearly upsampled to at most 16).
        dilate: digits only: also fit each image's dilation.
        nets_per_chunk: networks per chunk file (rounded down to whole items).
    """

    dataset: str = "digits"
    num_items: int | None = None
    views: int = 10
    widths: tuple[int, ...] = (2, 32, 32, 1)
    w0: float = 30.0
    steps: int = 300
    lr: float = 1e-3
    resolution: int = 8
    dilate: bool = True
    nets_per_chunk: int = 1000


#: SIREN frequency factor of the digits presets. The paper's MNIST SIRENs use
#: w0 = 30 on a 28x28 grid: with first-layer weights in [-1/2, 1/2] the
#: fastest initial sine turns by 30 * 0.5 * 2/27 = 1.1 rad from pixel to
#: pixel. On the 8x8 grid (spacing 2/7) w0 = 30 turns by 4.3 rad, beyond
#: pi: the fits alias, oscillating between pixels, and every weight-space
#: model stayed near chance on them. w0 = 8 keeps the paper's 1.1 rad per
#: pixel (the accuracies on both: ``docs/design-notes-code.md``).
DIGITS_W0 = 8.0

PRESETS: dict[str, dict[str, InrZooConfig]] = {
    "digits_inr": {
        "quick": InrZooConfig(num_items=256, views=2, w0=DIGITS_W0, steps=200),
        "full": InrZooConfig(w0=DIGITS_W0),
    },
    "mnist1d_inr": {
        "quick": InrZooConfig(
            dataset="mnist1d",
            widths=(1, 32, 32, 1),
            num_items=500,
            views=2,
            steps=150,
            lr=3e-3,
            dilate=False,
        ),
        "full": InrZooConfig(
            dataset="mnist1d", widths=(1, 32, 32, 1), lr=3e-3, dilate=False
        ),
    },
}


def coordinates(shape: tuple[int, ...]) -> torch.Tensor:
    """The SIREN inputs of a signal of ``shape``: a grid on [-1, 1]^d.

    Returns ``(prod(shape), len(shape))``, row-major (``indexing="ij"``), so
    ``siren(coordinates(img.shape)).reshape(img.shape)`` is the image.
    """
    axes = [torch.linspace(-1.0, 1.0, n) for n in shape]
    grid = torch.meshgrid(*axes, indexing="ij")
    return torch.stack(grid, dim=-1).reshape(-1, len(shape))


def dilate(images: torch.Tensor) -> torch.Tensor:
    """Grey dilation with a 3x3 cross: each pixel becomes the max of itself
    and its four neighbours. ``images``: ``(N, H, W)``.

    A cross rather than a full 3x3 square: at 8x8 the square turns most
    digits into blobs.
    """
    padded = F.pad(images, (1, 1, 1, 1), value=float("-inf"))
    shifts = [
        padded[:, 1:-1, 1:-1],
        padded[:, :-2, 1:-1],
        padded[:, 2:, 1:-1],
        padded[:, 1:-1, :-2],
        padded[:, 1:-1, 2:],
    ]
    return torch.stack(shifts).amax(dim=0)


@cache
def _digits() -> tuple[torch.Tensor, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return torch.tensor(data.images, dtype=torch.float32) / 16.0, data.target


@cache
def _mnist1d() -> tuple[torch.Tensor, np.ndarray, int]:
    from mnist1d.data import get_dataset_args, make_dataset

    data = make_dataset(get_dataset_args())  # procedural (seeded): no download
    x = np.concatenate([data["x"], data["x_test"]]).astype(np.float32)
    y = np.concatenate([data["y"], data["y_test"]])
    return torch.from_numpy(x), y, len(data["x"])


def _items(config: InrZooConfig) -> dict[str, Any]:
    """Targets, labels and splits of the zoo's items, in build order."""
    if config.dataset == "digits":
        images, labels = _digits()
        if config.resolution != 8:
            images = F.interpolate(
                images[:, None],
                size=(config.resolution, config.resolution),
                mode="bilinear",
                align_corners=True,
            )[:, 0]
        n = len(images)
        # The held-out 20% are the images meta_train holds out of digits.
        perm = np.random.default_rng(0).permutation(n)
        split = np.full(n, "train", dtype=object)
        split[perm[int(0.7 * n) : int(0.8 * n)]] = "val"
        split[perm[int(0.8 * n) :]] = "test"
        targets = images
    else:
        targets, labels, num_train = _mnist1d()
        n = len(targets)
        split = np.full(n, "test", dtype=object)
        split[: int(0.9 * num_train)] = "train"
        split[int(0.9 * num_train) : num_train] = "val"
    # Items are built in an order independent of the split, so a zoo of the
    # first num_items keeps the split proportions.
    order = np.random.default_rng(1).permutation(n)[: config.num_items]
    return {"order": order, "targets": targets, "labels": labels, "split": split}


def fit_sirens(
    spec: dict[str, Any],
    states: list[dict[str, torch.Tensor]],
    targets: torch.Tensor,
    steps: int,
    lr: float,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Fit one SIREN per target, all at once.

    Args:
        spec: a ``"siren"`` spec.
        states: initial state dicts, one per target.
        targets: ``(N, *shape)`` signals sampled on :func:`coordinates`.
        steps: full-batch Adam steps.
        lr: Adam learning rate.

    Returns:
        The stacked trained state (key -> ``(N, ...)``) and each net's final
        mean squared error ``(N,)``.
    """
    base = build_module(spec).to("meta")
    coords = coordinates(tuple(targets.shape[1:]))
    flat = targets.reshape(len(targets), -1)
    params = {
        k: torch.stack([s[k] for s in states]).requires_grad_() for k in states[0]
    }
    forward = vmap(partial(functional_call, base), in_dims=(0, None))

    def errors() -> torch.Tensor:
        pred = forward(params, (coords,))
        return (pred.reshape(flat.shape) - flat).pow(2).mean(dim=1)

    opt = torch.optim.Adam(params.values(), lr=lr)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        errors().sum().backward()
        opt.step()
    with torch.no_grad():
        mse = errors()
    return {k: v.detach() for k, v in params.items()}, mse


def _check(config: InrZooConfig) -> None:
    dims = {"digits": 2, "mnist1d": 1}
    if config.dataset not in dims:
        raise ValueError(f"Invalid INR dataset: {config.dataset!r}")
    if config.widths[0] != dims[config.dataset] or config.widths[-1] != 1:
        raise ValueError(
            f"Invalid SIREN widths {list(config.widths)} for {config.dataset}: "
            f"expected [{dims[config.dataset]}, ..., 1]"
        )
    if config.dataset == "digits" and not 8 <= config.resolution <= 16:
        raise ValueError(f"Invalid resolution: {config.resolution} (8 to 16)")
    if config.views < 1 or config.steps < 0 or config.nets_per_chunk < 1:
        raise ValueError(f"Invalid INR zoo config: {config}")


def plan_inr_zoo(config: InrZooConfig, seed: int) -> ZooPlan:
    """The plan of an INR zoo (see the module docstring)."""
    _check(config)
    spec = normalize_spec(
        {"kind": "siren", "widths": list(config.widths), "w0": config.w0}
    )
    items = _items(config)
    dilating = config.dataset == "digits" and config.dilate
    per_item = config.views * (2 if dilating else 1)
    items_per_chunk = max(1, config.nets_per_chunk // per_item)
    order = items["order"]
    num_chunks = -(-len(order) // items_per_chunk)
    peak = 1.0 if config.dataset == "digits" else None

    def build_chunk(k: int) -> Chunk:
        chunk_items = order[k * items_per_chunk : (k + 1) * items_per_chunk]
        first = k * items_per_chunk * per_item
        nets, states, targets = [], [], []
        for item in chunk_items:
            image = items["targets"][item]
            for view in range(config.views):
                init_seed = derive_seed(seed, int(item), view)
                state = init_state_dict(spec, init_seed)
                variants = [("image", image)]
                if dilating:
                    variants.append(("dilated", dilate(image[None])[0]))
                for j, (kind, target) in enumerate(variants):
                    record = {
                        "spec": "siren",
                        "row": len(nets),
                        "label": int(items["labels"][item]),
                        "split": str(items["split"][item]),
                        "item": int(item),
                        "view": view,
                        "target": kind,
                        "init_seed": init_seed,
                    }
                    if dilating:
                        record["pair"] = first + len(nets) + (1 if j == 0 else -1)
                    nets.append(record)
                    states.append(state)
                    targets.append(target)
        target = torch.stack(targets)
        params, mse = fit_sirens(spec, states, target, config.steps, config.lr)
        flat = target.reshape(len(target), -1)
        ranges = flat.amax(1) - flat.amin(1) if peak is None else torch.ones(len(flat))
        psnr = 10 * torch.log10(ranges.pow(2) / mse.clamp_min(1e-30))
        for net, m, p, v in zip(nets, mse.tolist(), psnr.tolist(), flat.var(1)):
            net.update(mse=m, psnr=p, target_variance=float(v))
        return Chunk(nets, {"siren": params}, {"target": target})

    def summarise(nets: list[dict[str, Any]]) -> dict[str, Any]:
        ratio = [n["mse"] / max(n["target_variance"], 1e-12) for n in nets]
        return {
            "num_nets": len(nets),
            "fit": {
                "psnr_db": describe([n["psnr"] for n in nets]),
                "mse": describe([n["mse"] for n in nets]),
                "mse_over_target_variance": describe(ratio),
                "mean_target_variance": float(
                    np.mean([n["target_variance"] for n in nets])
                ),
            },
            "split_counts": {
                s: sum(n["split"] == s for n in nets) for s in ("train", "val", "test")
            },
        }

    if config.dataset == "digits":
        shape = [config.resolution, config.resolution]
        data = {
            "dataset": "sklearn.datasets.load_digits",
            "values": "pixel / 16, in [0, 1]"
            + ("" if config.resolution == 8 else ", bilinear upsampling"),
            "dilation": "grey dilation, 3x3 cross (lopt.weightspace.zoos.inr.dilate)"
            if dilating
            else None,
            "split_rule": "permutation(default_rng(0)) of all 1,797 images: "
            "70% train, 10% val, last 20% test (meta_train's held-out digits)",
        }
    else:
        shape = [int(items["targets"].shape[1])]
        data = {
            "dataset": "mnist1d make_dataset(get_dataset_args()), raw values",
            "split_rule": "mnist1d's own test set is test; the last 10% of its "
            "training set is val",
        }
    data.update(
        {
            "shape": shape,
            "coordinates": "lopt.weightspace.zoos.inr.coordinates(shape): "
            "linspace(-1, 1) per axis, meshgrid ij, row-major",
            "num_items": len(order),
            "psnr_peak": "1 (pixel range)" if peak else "max - min of each signal",
        }
    )
    header = {
        "specs": {"siren": spec},
        "num_chunks": num_chunks,
        "num_nets": len(order) * per_item,
        "data": data,
        "labels": {
            "type": "class",
            "num_classes": 10,
            "description": "class of the item the INR fits",
        },
        "splits": {
            "unit": "item: all views (and dilations) of an item share its split"
        },
        "records": "item, view, target (image | dilated), pair (index of the "
        "counterpart fitted from the same init), init_seed, mse, psnr, "
        "target_variance",
    }
    return ZooPlan(header, build_chunk, summarise)
