"""A dataset of networks as neural graphs, with labels.

A plain :class:`torch.utils.data.Dataset` returning
:class:`~lopt.weightspace.NeuralGraphData`, batched by
:class:`torch_geometric.loader.DataLoader`. Not a PyG ``Dataset``: that class
caches processed graphs under ``root`` with ``torch.save``/``torch.load``
(pickles, which may execute code when loaded), and the graphs here are built
from modules or safetensors in milliseconds, so a second cache of the same
numbers would buy nothing. All graphs are built when the dataset is, so that
they share one kernel shape (one ``F_edge``) and bad inputs fail early.

On disk a network is two files: ``NAME.safetensors`` (its state_dict) and
``NAME.json`` (``{"architecture": ..., "y": ...}``, ``y`` optional). Loading
reads only those: the architecture is data that a factory (Python code the
caller passes, :func:`sequential_from_config` by default) turns into a module.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lopt.weightspace.graph.convert import build_graph
from lopt.weightspace.graph.data import NeuralGraphData
from lopt.weightspace.graph.screening import (
    SkippedNetwork,
    check_on_bad,
    nonfinite_report,
    screen,
)

__all__ = ["NeuralGraphDataset", "sequential_from_config", "save_network"]

#: The torch.nn layers :func:`sequential_from_config` may build.
SEQUENTIAL_LAYERS = {
    cls.__name__: cls
    for cls in (
        nn.Linear,
        nn.Conv1d,
        nn.Conv2d,
        nn.Conv3d,
        nn.BatchNorm1d,
        nn.BatchNorm2d,
        nn.BatchNorm3d,
        nn.LayerNorm,
        nn.GroupNorm,
        nn.ReLU,
        nn.LeakyReLU,
        nn.GELU,
        nn.SiLU,
        nn.ELU,
        nn.Softplus,
        nn.Tanh,
        nn.Sigmoid,
        nn.Flatten,
        nn.MaxPool1d,
        nn.MaxPool2d,
        nn.AvgPool1d,
        nn.AvgPool2d,
        nn.AdaptiveAvgPool1d,
        nn.AdaptiveAvgPool2d,
        nn.Dropout,
        nn.Identity,
    )
}


def sequential_from_config(config: Mapping) -> nn.Sequential:
    """``nn.Sequential`` from ``{"layers": [["Conv2d", {"in_channels": 1,
    ...}], ["ReLU", {}], ...]}`` (layer names from :data:`SEQUENTIAL_LAYERS`,
    keyword arguments JSON values; lists become tuples).

    Raises:
        ValueError: a config without ``layers`` or with an unknown layer.
    """
    if not isinstance(config, Mapping) or "layers" not in config:
        raise ValueError(f"architecture must be a dict with 'layers', got {config!r}")
    layers = []
    for entry in config["layers"]:
        name, kwargs = (entry[0], entry[1]) if len(entry) > 1 else (entry[0], {})
        if name not in SEQUENTIAL_LAYERS:
            raise ValueError(
                f"Unknown layer {name!r}; known: {sorted(SEQUENTIAL_LAYERS)}"
            )
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
        layers.append(SEQUENTIAL_LAYERS[name](**kwargs))
    return nn.Sequential(*layers)


def save_network(
    root: str | Path,
    name: str,
    state_dict: Mapping[str, torch.Tensor],
    architecture,
    y=None,
) -> None:
    """Write ``root/name.safetensors`` and ``root/name.json`` (the format
    :meth:`NeuralGraphDataset.from_directory` reads)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    save_file(tensors, str(root / f"{name}.safetensors"))
    meta = {"architecture": architecture}
    if y is not None:
        meta["y"] = y
    (root / f"{name}.json").write_text(json.dumps(meta))


def _shared_kernel_shape(shapes: Sequence[tuple[int, ...]]) -> tuple[int, ...]:
    ndim = max((len(s) for s in shapes), default=0)
    full = [(1,) * (ndim - len(s)) + tuple(s) for s in shapes]
    return tuple(max((s[d] for s in full), default=1) for d in range(ndim))


class NeuralGraphDataset(torch.utils.data.Dataset):
    """Networks as neural graphs, with optional labels ``y``.

    Args:
        modules: the networks, or one module per item whose weights
            ``state_dicts`` replaces (an architecture shared by a zoo may be
            one module repeated).
        labels: one label per network (a number, or a tensor of any shape;
            ``data.y`` is it with a leading dim of 1), or ``None``.
        state_dicts: weights for the modules, one per item, or ``None``.
        kernel_size: the kernel shape every graph is padded to; pass the same
            one to every split (default: the smallest all of these fit).
        transform: applied to a copy of each graph when it is read.
        names: what error messages call each item (default: ``item I``).
        on_bad: a network with a NaN or infinite weight, bias or buffer:
            ``"raise"`` a ``ValueError`` naming it, or ``"skip"`` it with a
            warning; :attr:`skipped` lists what was left out and
            :attr:`kept` the input positions of the items. (default:
            ``"raise"``)

    Attributes:
        kept: for each item, its position in ``modules``.
        skipped: the networks left out by ``on_bad="skip"``
            (:class:`~lopt.weightspace.graph.screening.SkippedNetwork`).

    Raises:
        ValueError: labels or state_dicts of another length than the modules,
            a state_dict that does not fit its module, or non-finite weights
            with ``on_bad="raise"`` (naming the item).
    """

    def __init__(
        self,
        modules: Sequence[nn.Module],
        labels: Sequence | torch.Tensor | None = None,
        *,
        state_dicts: Sequence[Mapping[str, torch.Tensor]] | None = None,
        kernel_size: Sequence[int] | None = None,
        transform: Callable[[NeuralGraphData], NeuralGraphData] | None = None,
        names: Sequence[str] | None = None,
        on_bad: str = "raise",
    ):
        check_on_bad(on_bad)
        modules = list(modules)
        if not modules:
            raise ValueError("NeuralGraphDataset needs at least one network")
        names = (
            list(names)
            if names is not None
            else [f"item {i}" for i in range(len(modules))]
        )
        for label, given in (("labels", labels), ("state_dicts", state_dicts)):
            if given is not None and len(given) != len(modules):
                raise ValueError(
                    f"got {len(given)} {label} for {len(modules)} networks"
                )
        reports = [
            nonfinite_report(
                state_dicts[i] if state_dicts is not None else module.state_dict()
            )
            for i, module in enumerate(modules)
        ]
        self.kept: list[int]
        self.skipped: list[SkippedNetwork]
        self.kept, self.skipped = screen(reports, names, on_bad, "NeuralGraphDataset")
        built = []
        for i in self.kept:
            module = modules[i]
            state = state_dicts[i] if state_dicts is not None else None
            try:
                built.append(build_graph(module, state))
            except ValueError as err:
                raise ValueError(f"{names[i]}: {err}") from err
        if kernel_size is None:
            kernel_size = _shared_kernel_shape([b.kernel_shape() for b, _ in built])
        self.kernel_size = tuple(kernel_size)
        self.transform = transform
        self._graphs = []
        for i, (builder, outputs) in zip(self.kept, built):
            try:
                data = builder.finish(outputs, self.kernel_size)
            except ValueError as err:
                raise ValueError(f"{names[i]}: {err}") from err
            if labels is not None:
                data.y = torch.as_tensor(labels[i]).unsqueeze(0)
            self._graphs.append(data)

    @classmethod
    def from_directory(
        cls,
        root: str | Path,
        factory: Callable[[object], nn.Module] = sequential_from_config,
        labels: Sequence | torch.Tensor | None = None,
        *,
        kernel_size: Sequence[int] | None = None,
        transform: Callable[[NeuralGraphData], NeuralGraphData] | None = None,
        on_bad: str = "raise",
    ) -> NeuralGraphDataset:
        """Every ``NAME.json`` + ``NAME.safetensors`` pair under ``root``, in
        sorted order of ``NAME``. ``factory`` builds each module from its
        JSON ``architecture``; labels come from ``labels`` or else from each
        JSON's ``y`` (all or none of them). ``on_bad`` as in the constructor;
        messages name each network by ``NAME``.

        Raises:
            FileNotFoundError: ``root`` is not a directory, or a JSON file has
                no weights file beside it.
            ValueError: no networks, a JSON without ``architecture``, labels
                in some JSON files only, or a state_dict that does not fit.
        """
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"{root} is not a directory")
        metas = sorted(root.glob("*.json"))
        if not metas:
            raise ValueError(f"{root} holds no NAME.json + NAME.safetensors networks")
        modules, states, found = [], [], []
        for meta_path in metas:
            weights = meta_path.with_suffix(".safetensors")
            if not weights.is_file():
                raise FileNotFoundError(
                    f"{meta_path.name} has no weights file {weights.name} beside it"
                )
            meta = json.loads(meta_path.read_text())
            if not isinstance(meta, dict) or "architecture" not in meta:
                raise ValueError(f"{meta_path.name} has no 'architecture' entry")
            modules.append(factory(meta["architecture"]))
            states.append(load_file(str(weights)))
            found.append(meta.get("y"))
        if labels is None and any(y is not None for y in found):
            if any(y is None for y in found):
                missing = [m.name for m, y in zip(metas, found) if y is None]
                raise ValueError(f"some JSON files have no 'y': {missing[:5]}")
            labels = found
        return cls(
            modules,
            labels,
            state_dicts=states,
            kernel_size=kernel_size,
            transform=transform,
            names=[m.stem for m in metas],
            on_bad=on_bad,
        )

    def __len__(self) -> int:
        return len(self._graphs)

    def __getitem__(self, index: int) -> NeuralGraphData:
        data = self._graphs[index]
        return data if self.transform is None else self.transform(data.clone())

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({len(self)}, kernel_size={self.kernel_size})"
