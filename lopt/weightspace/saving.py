"""Saving and loading a fitted predictor: one safetensors file, no pickle.

:func:`save_predictor` writes what a fitted
:class:`~lopt.weightspace.WeightSpaceTrainer` predicts with: its predictor's
``state_dict`` (weights, fitted input scales, standardisation, quantile
knots, tree nodes: all tensors) as safetensors, and everything else as JSON
in the file's safetensors metadata (the predictor's class and constructor
arguments, what fitting set that is not a tensor, such as an editing head's
delta shapes or NFN's architecture, the task, the label scaling and the
trainer's settings). :func:`load_predictor` rebuilds the predictor from the
JSON, loads the tensors strictly and returns a fitted trainer whose
predictions are identical::

    save_predictor(trainer, "accuracy.safetensors")
    trainer = load_predictor("accuracy.safetensors")
    trainer.predict(new_networks)

Loading reads tensors and JSON only and builds only the classes of
:func:`savable_classes` (the neural-graph models and every baseline), so a
file cannot run code. Writing goes to a temporary file in the same directory,
renamed into place once complete: a failed save leaves the previous file, or
none.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_safetensors
from torch import nn

if TYPE_CHECKING:
    from lopt.weightspace.training import WeightSpaceTrainer

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "savable_classes",
    "save_predictor",
    "load_predictor",
]

FORMAT_NAME = "lopt-weightspace-predictor"
FORMAT_VERSION = 1
#: The safetensors metadata key holding the JSON.
_KEY = "lopt"
#: The trainer's constructor arguments kept in the file.
_TRAINER_ARGS = (
    "lr",
    "weight_decay",
    "epochs",
    "batch_size",
    "patience",
    "max_seconds",
    "lr_patience",
    "grad_clip",
    "seed",
    "edit_scale",
)


def savable_classes() -> dict[str, type]:
    """``{name: class}`` of the predictors a file may name: the neural-graph
    models, :class:`~lopt.weightspace.GraphPredictor` and every baseline of
    :mod:`lopt.weightspace.baselines` (the modules there with
    ``get_config``)."""
    from lopt.weightspace.baselines import predictors as baselines
    from lopt.weightspace.models.gnn import NeuralGraphGNN
    from lopt.weightspace.models.transformer import NeuralGraphTransformer
    from lopt.weightspace.training import GraphPredictor

    found = {
        cls.__name__: cls
        for cls in (GraphPredictor, NeuralGraphGNN, NeuralGraphTransformer)
    }
    for name in baselines.__all__:
        cls = getattr(baselines, name)
        if isinstance(cls, type) and hasattr(cls, "get_config"):
            found[name] = cls
    return found


def describe(model: nn.Module) -> dict[str, Any]:
    """The JSON that rebuilds ``model`` (:func:`build`).

    Raises:
        TypeError: a predictor that is not one of :func:`savable_classes`.
    """
    name, classes = type(model).__name__, savable_classes()
    if classes.get(name) is not type(model):
        raise TypeError(
            f"cannot save a {name}: only lopt.weightspace's predictors save "
            f"({', '.join(classes)}); save its state_dict yourself"
        )
    if name == "GraphPredictor":
        return {
            "class": name,
            "config": {"normalize": model.normalize},
            "model": describe(model.model),
        }
    out: dict[str, Any] = {"class": name, "config": model.get_config()}
    if hasattr(model, "fitted_config"):
        out["fitted"] = model.fitted_config()
    return out


def build(description: dict[str, Any], task: str) -> nn.Module:
    """The unfitted-but-shaped predictor of :func:`describe`'s JSON, ready
    for its ``load_state_dict``.

    Raises:
        ValueError: a class not in :func:`savable_classes`, or a config its
            constructor refuses.
    """
    classes = savable_classes()
    name = description.get("class")
    if name not in classes:
        raise ValueError(
            f"Invalid predictor class {name!r} (expected one of {list(classes)})"
        )
    cls, config = classes[name], description.get("config", {})
    try:
        if name == "GraphPredictor":
            model = cls(build(description["model"], task), task, **config)
        elif hasattr(cls, "from_config"):
            model = cls.from_config(config)
        else:
            model = cls(**config)
    except (TypeError, KeyError) as err:
        raise ValueError(f"Invalid config for {name}: {config} ({err})") from err
    if hasattr(model, "task"):
        model.task = task
    if "fitted" in description:
        model.restore_fitted(description["fitted"])
    return model


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_predictor(trainer: WeightSpaceTrainer, path: str | os.PathLike) -> Path:
    """Write ``trainer``'s fitted predictor to ``path`` (see the module
    docs); returns the path.

    Raises:
        RuntimeError: the trainer is not fitted.
        TypeError: its predictor is not one of :func:`savable_classes`.
    """
    if not trainer.fitted:
        raise RuntimeError("call fit() before save_predictor(): nothing is fitted")
    path = Path(path)
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "task": trainer.task,
        "y_mean": trainer.y_mean,
        "y_std": trainer.y_std,
        "trainer": {name: getattr(trainer, name) for name in _TRAINER_ARGS},
        "predictor": describe(trainer.model),
    }
    tensors = {
        k: v.detach().cpu().clone().contiguous()
        for k, v in trainer.model.state_dict().items()
    }
    text = json.dumps(meta, allow_nan=False)
    _write_atomic(path, save_safetensors(tensors, metadata={_KEY: text}))
    return path


def load_predictor(path: str | os.PathLike) -> WeightSpaceTrainer:
    """The fitted trainer saved at ``path`` (:func:`save_predictor`).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: not a saved predictor (not safetensors, no or invalid
            JSON, another format version), or tensors that do not fit the
            predictor its JSON describes.
    """
    from lopt.weightspace.training import WeightSpaceTrainer

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No saved predictor at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            text = (f.metadata() or {}).get(_KEY)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as err:
        raise ValueError(
            f"Invalid predictor file {path}: not safetensors ({err})"
        ) from err
    try:
        meta = json.loads(text) if text is not None else None
    except json.JSONDecodeError as err:
        raise ValueError(f"Invalid predictor file {path}: bad JSON ({err})") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise ValueError(
            f"Invalid predictor file {path}: no {FORMAT_NAME} JSON in its "
            "metadata (not written by save_predictor)"
        )
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"Invalid predictor file {path}: format version "
            f"{meta.get('format_version')!r}, this lopt reads {FORMAT_VERSION}"
        )
    missing = [
        k for k in ("predictor", "task", "trainer", "y_mean", "y_std") if k not in meta
    ]
    if missing or not isinstance(meta["predictor"], dict):
        raise ValueError(
            f"Invalid predictor file {path}: its JSON lacks {missing or ['predictor']}"
        )
    model = build(meta["predictor"], meta["task"])
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as err:
        raise ValueError(
            f"Invalid predictor file {path}: its tensors do not fit the "
            f"{meta['predictor']['class']} its JSON describes: {err}"
        ) from err
    trainer = WeightSpaceTrainer(model, meta["task"], **meta["trainer"])
    trainer.y_mean, trainer.y_std = float(meta["y_mean"]), float(meta["y_std"])
    trainer.fitted = True
    model.eval()
    return trainer
