"""Model zoos for the weight-space tasks: built here, deterministic from a
seed, cached to disk (safetensors + JSON), resumable, with a progress bar.

Zoos (``size="quick"`` feeds quick benchmarks; ``"full"`` is for real runs):

- ``digits_inr``: SIRENs [2, 32, 32, 1], w0 = 8, fitted to the 8x8
  scikit-learn digits, ``views`` inits per image, each with its dilated-image
  counterpart (INR classification and editing). Label: digit class.
- ``mnist1d_inr``: SIRENs [1, 32, 32, 1] fitted to mnist1d signals.
- ``cnn_digits``: one small CNN trained on digits with random
  hyperparameters, several checkpoints per run (Small CNN Zoo style). Label:
  held-out accuracy.
- ``cnn_wild``: CNNs of varied depth, width, kernel, activation, residuals
  and BatchNorm (CNN Wild Park style); whole architecture families are
  test-only. Label: held-out accuracy.

Usage::

    python -m lopt.weightspace.zoos build digits_inr --out zoos/digits_inr --quick
    python -m lopt.weightspace.zoos info zoos/digits_inr

    from lopt.weightspace.zoos import build_zoo
    from lopt.weightspace.zoo_store import load_zoo
    zoo = load_zoo(build_zoo("digits_inr", "zoos/digits_inr", size="quick"))
    zoo.module(0), zoo.labels, zoo.split("test")

A build killed at any point resumes, with the same command, at the first
missing chunk and gives the same bytes as an uninterrupted build. Measured on
this machine: identical bytes across processes and across 1 and 2 torch
threads; another CPU or BLAS build may round differently.

Build times, measured with ``--threads 1`` (faster than 2 on this shared
2-core machine, where other engineers' jobs kept the load average at 1-3;
during the full builds this repository's slow tests also ran for a few
minutes; digits_inr re-timed at w0 = 8, 200 quick steps, next to a
benchmark on the other core; the cnn_digits range is two builds in two
sessions, the faster side by side with a cnn_wild build only); peak RSS of the
whole process, torch included:

=========== ============================ =============================================
zoo         quick                        full
=========== ============================ =============================================
digits_inr  1,024 nets, 13 s, 609 MiB    35,940 nets, 633 s, 653 MiB, 190 MB
mnist1d_inr 1,000 nets, 13 s, 502 MiB    50,000 nets, 734 s, 533 MiB, 241 MB
cnn_digits  144 nets, 15 s, 483 MiB      6,144 nets, 444-903 s, 522-605 MiB, 92 MB
cnn_wild    96 nets, 28 s, 394 MiB       10,368 nets, 2,044-2,434 s, 592-703 MiB, 376 MB
=========== ============================ =============================================

Quick: digits 256 images x 2 views x (image, dilated), 200 steps; mnist1d
500 signals x 2 views, 150 steps; 48 runs x checkpoints at 20/80/240 steps;
8 architectures x 6 runs x 40/160 steps. Full: all 1,797 digits x 10 views x
2, 300 steps (median PSNR 118 dB, min 42 dB); all
5,000 mnist1d signals x 10 views, 300 steps; 1,024 runs x 6 checkpoints
(25 to 800 steps); 288 architectures x 12 runs x 3 checkpoints (50/150/400),
206 families, 52 of them test-only (three builds in two sessions, each beside
a benchmark). The earlier full cnn_wild, 96 architectures (``--set
architectures=96``), had 3,456 nets and built in 754-1,279 s at 529-585 MiB,
111 MB on disk.
"""

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

from lopt.weightspace import cnn_zoo, inr
from lopt.weightspace.zoo_store import (
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
