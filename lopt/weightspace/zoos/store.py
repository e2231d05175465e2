"""On-disk format of model zoos: safetensors + JSON, written chunk by chunk.

A zoo is a directory::

    zoo.json                  header: name, seed, version, build command and
                              config, spec table, splits, label description,
                              status, summary figures, build sessions
    chunk_00000.safetensors   the weights of up to a few hundred networks
    chunk_00000.json          one record per network of that chunk, and the
                              SHA-256 of the safetensors file
    chunk_00001.safetensors
    ...

Chunk tensors are named ``params/<spec id>/<state-dict key>``, stacked over
the chunk's networks of that spec (row ``r`` of the stack is the network whose
record has ``"row": r``), and ``extra/<name>``, stacked over all networks of
the chunk in record order (for example the image an INR was fitted to).

Every file is written under a temporary name and renamed into place, the
chunk's JSON last: a chunk exists once its JSON does, so a build killed at any
moment leaves whole chunks only, and resuming rebuilds exactly the missing
ones. Loading reads safetensors and JSON only (never pickles, never code) and
checks each chunk's SHA-256.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from lopt.weightspace.graph.screening import SkippedNetwork, check_on_bad, screen
from lopt.weightspace.zoos.specs import build_module

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "HEADER_FILE",
    "Chunk",
    "Zoo",
    "ZooPlan",
    "chunk_is_complete",
    "derive_seed",
    "describe",
    "load_zoo",
    "read_chunk",
    "read_header",
    "write_chunk",
    "write_header",
]

FORMAT_NAME = "lopt-zoo"
FORMAT_VERSION = 1
HEADER_FILE = "zoo.json"
_PARAMS, _EXTRA = "params/", "extra/"


@dataclass
class Chunk:
    """The networks of one chunk.

    Attributes:
        nets: one JSON record per network, in order; each has at least
            ``spec`` (a key of the zoo's spec table) and ``row`` (its row in
            ``params[spec]``).
        params: spec id -> state-dict key -> tensor stacked over the chunk's
            networks of that spec.
        extras: name -> tensor whose first dimension runs over ``nets``.
    """

    nets: list[dict[str, Any]]
    params: dict[str, dict[str, torch.Tensor]]
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class ZooPlan:
    """What a zoo builder hands the build driver.

    Attributes:
        header: the zoo's identity, written to ``zoo.json``: ``specs`` (spec
            id -> spec), ``num_chunks``, ``splits``, ``labels``, ``data`` and
            anything else that is fixed before training. A resumed build must
            plan the same header.
        build_chunk: trains and returns chunk ``k``; a pure function of the
            plan and ``k``, so any chunk can be rebuilt alone.
        summarise: figures for ``zoo.json`` (fit quality, label spread) from
            every network's record, called once all chunks exist.
    """

    header: dict[str, Any]
    build_chunk: Callable[[int], Chunk]
    summarise: Callable[[list[dict[str, Any]]], dict[str, Any]]


def derive_seed(seed: int, *keys: int) -> int:
    """A 31-bit seed for the object named by ``keys`` in the zoo of ``seed``.

    Independent of how objects are grouped into chunks, so a network's
    initialisation depends only on the zoo seed and its own identity.
    """
    sequence = np.random.SeedSequence(seed, spawn_key=tuple(int(k) for k in keys))
    return int(sequence.generate_state(1)[0] >> 1)


def describe(values: list[float]) -> dict[str, float]:
    """Mean and quantiles of ``values`` (for the summaries in ``zoo.json``)."""
    arr = np.asarray(values, dtype=np.float64)
    qs = np.quantile(arr, [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0])
    names = ("min", "q10", "q25", "median", "q75", "q90", "max")
    out = {"mean": float(arr.mean())}
    out.update({name: float(q) for name, q in zip(names, qs)})
    return out


def chunk_stem(index: int) -> str:
    """File name of chunk ``index`` without extension: ``chunk_00003``."""
    return f"chunk_{index:05d}"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _dumps(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True, allow_nan=False) + "\n").encode()


def remove_stale_temporaries(path: str | os.PathLike) -> None:
    """Delete temporary files that a killed build left behind in ``path``."""
    for tmp in Path(path).glob(".*.tmp-*"):
        tmp.unlink(missing_ok=True)


def write_header(path: str | os.PathLike, header: dict[str, Any]) -> None:
    """Write ``zoo.json`` atomically (the format fields are added here)."""
    header = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **header}
    _write_atomic(Path(path) / HEADER_FILE, _dumps(header))


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check ``zoo.json``.

    Raises:
        FileNotFoundError: ``path`` has no ``zoo.json``.
        ValueError: it is not valid JSON, not a zoo header, or of another
            format version.
    """
    file = Path(path) / HEADER_FILE
    if not file.is_file():
        raise FileNotFoundError(f"No zoo at {path}: missing {HEADER_FILE}")
    try:
        header = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"Zoo header {file} is not valid JSON: {err}") from err
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
        raise ValueError(f"{file} is not an lopt zoo header")
    if header.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"Zoo {path} has format version {header.get('format_version')!r}; "
            f"this lopt reads version {FORMAT_VERSION}"
        )
    return header


def write_chunk(path: str | os.PathLike, index: int, chunk: Chunk) -> None:
    """Write chunk ``index`` of the zoo at ``path``: tensors, then its JSON."""
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    for spec_id, state in chunk.params.items():
        if "/" in spec_id:
            raise ValueError(f"Invalid spec id {spec_id!r}: must not contain '/'")
        for key, value in state.items():
            tensors[f"{_PARAMS}{spec_id}/{key}"] = value.detach().cpu().contiguous()
    for name, value in chunk.extras.items():
        if value.shape[0] != len(chunk.nets):
            raise ValueError(
                f"Extra {name!r} has {value.shape[0]} rows for {len(chunk.nets)} nets"
            )
        tensors[f"{_EXTRA}{name}"] = value.detach().cpu().contiguous()
    data = save_safetensors(tensors)
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "chunk": index,
        "num_nets": len(chunk.nets),
        "sha256": _sha256(data),
        "nets": chunk.nets,
    }
    stem = chunk_stem(index)
    _write_atomic(path / f"{stem}.safetensors", data)
    _write_atomic(path / f"{stem}.json", _dumps(meta))


def _read_chunk_meta(path: Path, index: int) -> dict[str, Any]:
    file = path / f"{chunk_stem(index)}.json"
    if not file.is_file():
        raise FileNotFoundError(f"Zoo {path} is missing chunk {index}: no {file.name}")
    try:
        meta = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"Zoo chunk {file} is corrupted: {err}") from err
    if (
        not isinstance(meta, dict)
        or meta.get("format") != FORMAT_NAME
        or meta.get("chunk") != index
        or not isinstance(meta.get("nets"), list)
        or meta.get("num_nets") != len(meta["nets"])
    ):
        raise ValueError(f"Zoo chunk {file} is corrupted: not chunk {index}'s record")
    return meta


def _read_chunk_data(path: Path, index: int, meta: dict[str, Any]) -> bytes:
    file = path / f"{chunk_stem(index)}.safetensors"
    if not file.is_file():
        raise FileNotFoundError(f"Zoo {path} is missing chunk {index}: no {file.name}")
    data = file.read_bytes()
    actual = _sha256(data)
    if actual != meta.get("sha256"):
        raise ValueError(
            f"Zoo chunk {file} is corrupted: its SHA-256 is {actual}, but "
            f"{chunk_stem(index)}.json records {meta.get('sha256')}"
        )
    return data


def chunk_is_complete(path: str | os.PathLike, index: int) -> bool:
    """Whether chunk ``index`` exists whole (both files, checksum matching)."""
    try:
        _read_chunk_data(Path(path), index, _read_chunk_meta(Path(path), index))
    except (FileNotFoundError, ValueError):
        return False
    return True


def read_chunk(path: str | os.PathLike, index: int) -> Chunk:
    """Read chunk ``index`` and verify its checksum.

    Raises:
        FileNotFoundError: one of its two files is missing.
        ValueError: a file is corrupted (checksum mismatch, bad JSON, records
            that do not match the tensors).
    """
    path = Path(path)
    meta = _read_chunk_meta(path, index)
    data = _read_chunk_data(path, index, meta)
    try:
        tensors = load_safetensors(data)
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(
            f"Zoo chunk {path / chunk_stem(index)} is corrupted: {err}"
        ) from err
    params: dict[str, dict[str, torch.Tensor]] = {}
    extras: dict[str, torch.Tensor] = {}
    for name, value in tensors.items():
        if name.startswith(_PARAMS):
            spec_id, key = name[len(_PARAMS) :].split("/", 1)
            params.setdefault(spec_id, {})[key] = value
        elif name.startswith(_EXTRA):
            extras[name[len(_EXTRA) :]] = value
    for i, net in enumerate(meta["nets"]):
        stack = params.get(net.get("spec"), {})
        row = net.get("row")
        if not stack or not isinstance(row, int) or not 0 <= row < _rows(stack):
            raise ValueError(
                f"Zoo chunk {path / chunk_stem(index)} is corrupted: net {i} refers "
                f"to spec {net.get('spec')!r} row {row!r}, which it does not hold"
            )
    return Chunk(meta["nets"], params, extras)


def _rows(state: dict[str, torch.Tensor]) -> int:
    return next(iter(state.values())).shape[0]


@dataclass
class Zoo:
    """A zoo loaded in memory.

    Attributes:
        path: the zoo directory.
        header: the contents of ``zoo.json``.
        specs: spec id -> architecture spec (see :mod:`zoo_specs`).
        nets: one record per network; ``index`` is its position here, ``row``
            its row in ``params[spec]``, ``chunk`` the chunk it came from.
        params: spec id -> state-dict key -> tensor stacked over every
            network of that spec (``torch.func.functional_call`` under
            ``vmap`` takes these directly).
        extras: name -> tensor stacked over ``nets``.
        skipped: networks left out by ``load_zoo(on_bad="skip")``; their
            ``index`` is their position among all the zoo's networks.
    """

    path: Path
    header: dict[str, Any]
    specs: dict[str, dict[str, Any]]
    nets: list[dict[str, Any]]
    params: dict[str, dict[str, torch.Tensor]]
    extras: dict[str, torch.Tensor]
    skipped: list[SkippedNetwork] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.nets)

    @property
    def labels(self) -> torch.Tensor:
        """Every network's ``label``: int64 for classes, float32 otherwise."""
        values = [net["label"] for net in self.nets]
        if all(isinstance(v, int) for v in values):
            return torch.tensor(values, dtype=torch.long)
        return torch.tensor(values, dtype=torch.float32)

    def split(self, name: str) -> list[int]:
        """Indices of the networks in split ``name`` (train / val / test)."""
        return [i for i, net in enumerate(self.nets) if net.get("split") == name]

    def state_dict(self, index: int) -> dict[str, torch.Tensor]:
        """The ``state_dict`` of network ``index``."""
        net = self.nets[index]
        return {k: v[net["row"]] for k, v in self.params[net["spec"]].items()}

    def module(self, index: int) -> nn.Module:
        """Network ``index`` as a module in eval mode (loaded strictly)."""
        with torch.random.fork_rng(devices=[]):
            module = build_module(self.specs[self.nets[index]["spec"]])
        module.load_state_dict(self.state_dict(index), strict=True)
        return module.eval()


def _nonfinite_reports(
    nets: list[dict[str, Any]], params: dict[str, dict[str, torch.Tensor]]
) -> list[str | None]:
    """For each network, ``None`` or the tensors holding NaN / inf values
    (checked per spec on the stacked tensors, not network by network)."""
    bad_keys: dict[str, dict[int, list[str]]] = {}
    for spec_id, state in params.items():
        for key, value in state.items():
            if not value.is_floating_point():
                continue
            rows = (~torch.isfinite(value.reshape(len(value), -1))).any(1)
            for row in rows.nonzero().flatten().tolist():
                bad_keys.setdefault(spec_id, {}).setdefault(row, []).append(key)
    reports: list[str | None] = []
    for net in nets:
        keys = bad_keys.get(net["spec"], {}).get(net["row"])
        reports.append(None if keys is None else "non-finite " + ", ".join(keys))
    return reports


def load_zoo(path: str | os.PathLike, on_bad: str = "raise") -> Zoo:
    """Load a complete zoo built by :func:`lopt.weightspace.zoos.build_zoo`.

    Args:
        path: the zoo directory.
        on_bad: a network with a NaN or infinite entry: ``"raise"`` a
            ``ValueError`` naming it, or ``"skip"`` it (with a warning; the
            zoo's ``skipped`` lists it). Zoos built here keep a diverged run's
            last finite weights, so they hold none. (default: ``"raise"``)

    Raises:
        FileNotFoundError: no zoo at ``path`` or a chunk file is missing.
        ValueError: the zoo is incomplete (its build was interrupted), a
            file is corrupted, or a network is not finite (``"raise"``).
    """
    check_on_bad(on_bad)
    path = Path(path)
    header = read_header(path)
    if header.get("status") != "complete":
        raise ValueError(
            f"Zoo {path} is incomplete (status {header.get('status')!r}); "
            "resume its build with the same command"
        )
    parts: dict[str, dict[str, list[torch.Tensor]]] = {}
    extra_parts: dict[str, list[torch.Tensor]] = {}
    offsets: dict[str, int] = {}
    nets: list[dict[str, Any]] = []
    for index in range(header["num_chunks"]):
        chunk = read_chunk(path, index)
        for net in chunk.nets:
            nets.append(
                {
                    **net,
                    "index": len(nets),
                    "chunk": index,
                    "row": offsets.get(net["spec"], 0) + net["row"],
                }
            )
        for spec_id, state in chunk.params.items():
            for key, value in state.items():
                parts.setdefault(spec_id, {}).setdefault(key, []).append(value)
            offsets[spec_id] = offsets.get(spec_id, 0) + _rows(state)
        for name, value in chunk.extras.items():
            extra_parts.setdefault(name, []).append(value)
    params = {
        spec_id: {k: torch.cat(v) for k, v in state.items()}
        for spec_id, state in parts.items()
    }
    extras = {k: torch.cat(v) for k, v in extra_parts.items()}
    unknown = sorted(set(params) - set(header["specs"]))
    if unknown:
        raise ValueError(f"Zoo {path} holds weights of unknown specs {unknown}")
    names = [
        f"net {n['index']} of zoo {path} (chunk {n['chunk']}, spec {n['spec']})"
        for n in nets
    ]
    kept, skipped = screen(_nonfinite_reports(nets, params), names, on_bad, "load_zoo")
    if skipped:
        rows = torch.as_tensor(kept, dtype=torch.long)
        extras = {k: v[rows] for k, v in extras.items()}
        nets = [{**nets[i], "index": new} for new, i in enumerate(kept)]
    return Zoo(path, header, header["specs"], nets, params, extras, skipped)
