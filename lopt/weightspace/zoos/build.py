"""Building and loading the zoos: the registry of zoo names, their size
presets, and the ``build`` / ``info`` command line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import shlex
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lopt.weightspace.zoos import cnn as cnn_zoo
from lopt.weightspace.zoos import inr
from lopt.weightspace.zoos.store import (
    FORMAT_VERSION,
    ZooPlan,
    chunk_is_complete,
    read_chunk,
    read_header,
    remove_stale_temporaries,
    write_chunk,
    write_header,
)

__all__ = ["SIZES", "ZOO_NAMES", "build_zoo", "main", "zoo_config"]

SIZES = ("quick", "full")

_REGISTRY: dict[str, tuple[Mapping[str, Any], Callable[[Any, int], ZooPlan]]] = {
    "digits_inr": (inr.PRESETS["digits_inr"], inr.plan_inr_zoo),
    "mnist1d_inr": (inr.PRESETS["mnist1d_inr"], inr.plan_inr_zoo),
    "cnn_digits": (cnn_zoo.PRESETS["cnn_digits"], cnn_zoo.plan_cnn_zoo),
    "cnn_wild": (cnn_zoo.PRESETS["cnn_wild"], cnn_zoo.plan_wild_zoo),
}
ZOO_NAMES = tuple(_REGISTRY)
#: Header fields that identify a zoo: a resumed build must plan the same ones.
_IDENTITY = (
    "name",
    "seed",
    "size",
    "config",
    "specs",
    "num_chunks",
    "data",
    "splits",
    "labels",
)


def zoo_config(name: str, size: str = "quick", **overrides: Any) -> Any:
    """The build config of zoo ``name`` at ``size``, with fields overridden.

    Raises:
        ValueError: unknown zoo, size or config field.
    """
    if name not in _REGISTRY:
        raise ValueError(f"Invalid zoo name: {name!r} (expected one of {ZOO_NAMES})")
    if size not in SIZES:
        raise ValueError(f"Invalid zoo size: {size!r} (expected one of {SIZES})")
    config = _REGISTRY[name][0][size]
    fields = {f.name: f for f in dataclasses.fields(config)}
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ValueError(
            f"Invalid config fields for {name}: {unknown} (expected some of "
            f"{sorted(fields)})"
        )
    fixed = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    return dataclasses.replace(config, **fixed)


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj))


def preset_differences(
    header: Mapping[str, Any], name: str, size: str
) -> dict[str, tuple[Any, Any]]:
    """``{field: (built, preset)}`` for each config field of a zoo's header
    that differs from the current ``name`` / ``size`` preset (empty when the
    zoo is the preset's: built with no ``--set`` by this version)."""
    preset = _jsonable(dataclasses.asdict(zoo_config(name, size)))
    built = header.get("config", {})
    return {k: (built.get(k), v) for k, v in preset.items() if built.get(k) != v}


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _build_command(
    name: str, out: Path, size: str, seed: int, overrides: Mapping[str, Any]
) -> str:
    args = ["python", "-m", "lopt.weightspace.zoos", "build", name, "--out", str(out)]
    args += ["--size", size, "--seed", str(seed)]
    for key, value in sorted(overrides.items()):
        args += ["--set", f"{key}={json.dumps(value)}"]
    return shlex.join(args)


def build_zoo(
    name: str,
    out_dir: str | os.PathLike,
    *,
    size: str = "quick",
    seed: int = 0,
    progress: bool = True,
    config: Mapping[str, Any] | None = None,
    max_chunks: int | None = None,
    threads: int | None = None,
) -> Path:
    """Build zoo ``name`` into ``out_dir``, or resume its interrupted build.

    Chunks already on disk (whole, checksum matching) are kept; the missing
    ones are trained and written one by one, each atomically. When all exist,
    ``zoo.json`` gets ``status: "complete"`` and the summary figures.

    Args:
        name: one of :data:`ZOO_NAMES`.
        out_dir: the zoo directory (created if needed).
        size: ``"quick"`` or ``"full"``.
        seed: everything random (inits, hyperparameters, batches, splits of
            the CNN zoos) derives from it.
        progress: show a tqdm bar over chunks.
        config: overrides of fields of the size's config (see
            :func:`zoo_config`), for example ``{"views": 2}``.
        max_chunks: build at most this many chunks now and leave the rest
            for a later call (incremental builds).
        threads: torch threads while building (restored afterwards); ``None``
            keeps the current setting. Resume with the same count for
            byte-identical chunks.

    Returns:
        ``out_dir`` as a ``Path``.

    Raises:
        ValueError: invalid arguments, or ``out_dir`` holds a different zoo.
    """
    if threads is None:
        return _build(name, out_dir, size, seed, progress, config, max_chunks)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _build(name, out_dir, size, seed, progress, config, max_chunks)
    finally:
        torch.set_num_threads(before)


def _build(
    name: str,
    out_dir: str | os.PathLike,
    size: str,
    seed: int,
    progress: bool,
    config: Mapping[str, Any] | None,
    max_chunks: int | None,
) -> Path:
    overrides = dict(config or {})
    cfg = zoo_config(name, size, **overrides)
    out = Path(out_dir)
    started, t0 = time.strftime("%Y-%m-%dT%H:%M:%S"), time.perf_counter()
    plan = _REGISTRY[name][1](cfg, seed)
    header = _jsonable(
        {
            "name": name,
            "seed": seed,
            "size": size,
            "config": dataclasses.asdict(cfg),
            "build_command": _build_command(name, out, size, seed, overrides),
            **plan.header,
        }
    )
    out.mkdir(parents=True, exist_ok=True)
    sessions: list[dict[str, Any]] = []
    if (out / "zoo.json").exists():
        old = read_header(out)
        differ = [k for k in _IDENTITY if old.get(k) != header.get(k)]
        if differ:
            raise ValueError(
                f"{out} holds a different zoo (its {differ} differ from this "
                "build's); use another directory"
            )
        sessions = old.get("build_sessions", [])
    remove_stale_temporaries(out)
    write_header(out, {**header, "status": "building", "build_sessions": sessions})
    num_chunks = header["num_chunks"]
    missing = [k for k in range(num_chunks) if not chunk_is_complete(out, k)]
    todo = missing if max_chunks is None else missing[:max_chunks]
    bar = tqdm(
        total=num_chunks,
        initial=num_chunks - len(missing),
        unit="chunk",
        desc=name,
        disable=not progress,
    )
    for k in todo:
        write_chunk(out, k, plan.build_chunk(k))
        bar.update(1)
    bar.close()
    sessions.append(
        {
            "started": started,
            "wall_s": round(time.perf_counter() - t0, 2),
            "chunks_built": len(todo),
            "peak_rss_mib": round(_peak_rss_mib(), 1),
            "torch_threads": torch.get_num_threads(),
            "torch_version": torch.__version__,
        }
    )
    final = {**header, "status": "building", "build_sessions": sessions}
    if all(chunk_is_complete(out, k) for k in range(num_chunks)):
        nets = [net for k in range(num_chunks) for net in read_chunk(out, k).nets]
        final.update(status="complete", summary=plan.summarise(nets))
        final["num_nets"] = len(nets)
    write_header(out, final)
    return out


def _parse_set(items: Sequence[str]) -> dict[str, Any]:
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return overrides


def _info(path: Path) -> None:
    header = read_header(path)
    done = sum(chunk_is_complete(path, k) for k in range(header["num_chunks"]))
    print(f"{header['name']} ({header['size']}, seed {header['seed']}) at {path}")
    print(
        f"status: {header['status']}, chunks {done}/{header['num_chunks']}, "
        f"nets {header.get('num_nets')}, specs {len(header['specs'])}, "
        f"format version {FORMAT_VERSION}"
    )
    print(f"build command: {header['build_command']}")
    for session in header.get("build_sessions", []):
        print(
            f"session {session['started']}: {session['wall_s']} s, "
            f"{session['chunks_built']} chunks, peak RSS "
            f"{session['peak_rss_mib']} MiB, {session['torch_threads']} threads"
        )
    if "summary" in header:
        print(json.dumps(header["summary"], indent=1))


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``build NAME --out DIR [--quick] [--seed S]``, ``info DIR``."""
    parser = argparse.ArgumentParser(prog="python -m lopt.weightspace.zoos")
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build or resume a zoo")
    build.add_argument("name", choices=ZOO_NAMES)
    build.add_argument("--out", required=True, type=Path)
    build.add_argument("--size", choices=SIZES, default="full")
    build.add_argument("--quick", action="store_true", help="same as --size quick")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field (JSON value), e.g. --set views=4",
    )
    build.add_argument("--max-chunks", type=int, default=None)
    build.add_argument("--threads", type=int, default=None, help="torch threads")
    build.add_argument("--no-progress", action="store_true")
    info = sub.add_parser("info", help="describe a zoo directory")
    info.add_argument("path", type=Path)
    args = parser.parse_args(argv)
    if args.command == "info":
        _info(args.path)
        return 0
    t0 = time.perf_counter()
    out = build_zoo(
        args.name,
        args.out,
        size="quick" if args.quick else args.size,
        seed=args.seed,
        progress=not args.no_progress,
        config=_parse_set(args.set),
        max_chunks=args.max_chunks,
        threads=args.threads,
    )
    header = read_header(out)
    threads = header["build_sessions"][-1]["torch_threads"]
    print(
        f"{args.name}: {header['status']} at {out}, wall {time.perf_counter() - t0:.1f}"
        f" s, peak RSS {_peak_rss_mib():.0f} MiB, {threads} torch threads"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
