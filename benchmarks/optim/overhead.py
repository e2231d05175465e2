"""Cost of NGOptimizer against ``torch.optim.Adam(foreach=True)`` as models grow.

Usage::

    python -m benchmarks.optim.overhead [--quick] [--out DIR]

For two model families (an MLP and a CNN, each scaled to about 1e4, 1e5, 1e6
and 1e7 parameters; ``--quick`` stops at 1e6 and repeats fewer times):

* **step time**: ``opt.step()`` alone, gradients fixed;
* **train-step time**: ``zero_grad`` + forward + backward + ``step`` on a
  batch of 128;

both measured side by side in one process on identical model copies
(interleaved calls, warm-up first, median of the repeats), and

* **peak memory** of one optimizer step (state created on the first step plus
  transient buffers) and of one whole training step, each measured in a fresh
  process from the operating system's RSS high-water mark (see
  :mod:`benchmarks.common.memory`); plus the exact bytes of the optimizer's
  persistent tensors (state, and for NG its graph index).

Writes ``overhead.json``, ``overhead.md`` and ``overhead.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import gc
import sys
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from benchmarks.common import report
from benchmarks.common.cli import (
    add_common_arguments,
    output_dir,
    quick_parser,
    save_and_print,
)
from benchmarks.common.memory import PeakMemory, run_isolated, tensor_bytes
from benchmarks.common.provenance import run_metadata
from benchmarks.common.timing import interleaved_times
from benchmarks.optim.optimizers import load_ng_rule
from benchmarks.optim.plotting import plot_overhead

__all__ = [
    "FAMILIES",
    "OPTIMIZERS",
    "build_model",
    "size_for",
    "memory_probe",
    "measure_overhead",
    "markdown_report",
    "write_outputs",
    "main",
]

FULL_SIZES = (10_000, 100_000, 1_000_000, 10_000_000)
QUICK_SIZES = (10_000, 100_000, 1_000_000)
BATCH = 128
CLASSES = 10
#: MLP input features.
MLP_IN = 256
#: CNN input: 3 channels, 8x8 (small, so 1e7-parameter train steps stay cheap).
CNN_IN = (3, 8, 8)
OPTIMIZERS = ("ng", "adam")


def _mlp_params(width: int) -> int:
    sizes = [MLP_IN, width, width, width, CLASSES]
    return sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:]))


def _cnn_params(channels: int) -> int:
    c_in = CNN_IN[0]
    return (
        (9 * c_in * channels + channels)
        + 2 * (9 * channels * channels + channels)
        + (channels * CLASSES + CLASSES)
    )


#: Family -> parameter count as a function of its width (units or channels).
FAMILIES: dict[str, Callable[[int], int]] = {"mlp": _mlp_params, "cnn": _cnn_params}


def size_for(family: str, num_params: int) -> int:
    """Width of ``family`` whose parameter count is closest to ``num_params``."""
    count = FAMILIES[family]
    low, high = 1, 1
    while count(high) < num_params:
        high *= 2
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if count(mid) < num_params else (low, mid)
    return min((low, high), key=lambda w: abs(count(w) - num_params))


def build_model(family: str, width: int, seed: int = 0) -> nn.Module:
    """An MLP (3 hidden layers of ``width``) or a CNN (3 convs of ``width``
    channels, two of stride 2, global average pooling, linear head)."""
    torch.manual_seed(seed)
    if family == "mlp":
        return nn.Sequential(
            nn.Linear(MLP_IN, width),
            nn.ReLU(),
            nn.Linear(width, width),
            nn.ReLU(),
            nn.Linear(width, width),
            nn.ReLU(),
            nn.Linear(width, CLASSES),
        )
    if family == "cnn":
        return nn.Sequential(
            nn.Conv2d(CNN_IN[0], width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(width, CLASSES),
        )
    raise ValueError(f"Invalid family: {family!r} (known: {list(FAMILIES)})")


def _batch(family: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shape = (BATCH, MLP_IN) if family == "mlp" else (BATCH, *CNN_IN)
    return torch.randn(shape, generator=gen), torch.randint(
        0, CLASSES, (BATCH,), generator=gen
    )


def _optimizer(name: str, model: nn.Module, rule) -> torch.optim.Optimizer:
    if name == "ng":
        from lopt import NGOptimizer

        return NGOptimizer(model.parameters(), rule=rule)
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=1e-3, foreach=True)
    raise ValueError(f"Invalid optimizer: {name!r}")


def _fix_grads(model: nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = 1e-3 * torch.randn(p.shape, generator=gen)


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, batch) -> Callable:
    x, y = batch

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def _persistent_bytes(opt: torch.optim.Optimizer) -> int:
    tensors = [t for state in opt.state.values() for t in state.values()]
    graph = getattr(opt, "graph", None)
    if graph is not None:  # NG also keeps the graph's index tensors
        tensors += [v for v in vars(graph).values() if isinstance(v, torch.Tensor)]
    return tensor_bytes(tensors)


def memory_probe(
    family: str, width: int, optimizer: str, rule: str | None = None, threads: int = 1
) -> dict:
    """Peak memory of one step and of one training step (run it in a fresh
    process: see :func:`benchmarks.common.memory.run_isolated`).

    Returns:
        ``{"peak_bytes", "train_peak_bytes", "state_bytes", "method"}``: the
        peak RSS added by the first ``opt.step()`` (gradients fixed, state
        created), the peak added by a whole training step after it, and the
        exact bytes of the optimizer's persistent tensors.
    """
    torch.set_num_threads(threads)
    loaded_rule = load_ng_rule(rule)
    # One-time costs (lazy imports, kernel and allocator set-up) on a tiny model
    # first, so they are not charged to the step measured below.
    tiny = build_model(family, 4)
    tiny_opt = _optimizer(optimizer, tiny, loaded_rule)
    _fix_grads(tiny)
    tiny_opt.step()
    _train_step(tiny, tiny_opt, _batch(family))()
    del tiny, tiny_opt
    model = build_model(family, width)
    opt = _optimizer(optimizer, model, loaded_rule)
    batch = _batch(family)
    _fix_grads(model)
    gc.collect()
    with PeakMemory() as step_peak:
        opt.step()
    train_step = _train_step(model, opt, batch)
    gc.collect()
    with PeakMemory() as train_peak:
        train_step()
    return {
        "peak_bytes": step_peak.bytes,
        "train_peak_bytes": train_peak.bytes,
        "state_bytes": _persistent_bytes(opt),
        "method": step_peak.method,
    }


def _time_pair(family: str, width: int, rule, repeats: int, warmup: int) -> dict:
    """Step and train-step medians of NG and Adam on identical model copies."""
    models = {name: build_model(family, width) for name in OPTIMIZERS}
    opts = {name: _optimizer(name, models[name], rule) for name in OPTIMIZERS}
    for model in models.values():
        _fix_grads(model)
    step = interleaved_times(
        {name: opt.step for name, opt in opts.items()}, repeats, warmup
    )
    batch = _batch(family)
    train = interleaved_times(
        {n: _train_step(models[n], opts[n], batch) for n in OPTIMIZERS},
        repeats,
        warmup,
    )
    return {
        name: {
            "step_ms": step[name]["median_ms"],
            "step_ms_range": [step[name]["min_ms"], step[name]["max_ms"]],
            "train_step_ms": train[name]["median_ms"],
            "train_step_ms_range": [train[name]["min_ms"], train[name]["max_ms"]],
        }
        for name in OPTIMIZERS
    }


def _repeats_for(num_params: int, repeats: int) -> int:
    # Big models: each call takes seconds and its noise is relatively small.
    return max(3, repeats // 2) if num_params >= 3_000_000 else repeats


def measure_overhead(
    families: Sequence[str],
    sizes: Sequence[int],
    *,
    repeats: int = 10,
    warmup: int = 2,
    memory: bool = True,
    rule_path: str | None = None,
    progress: bool = True,
) -> list[dict]:
    """Time and memory of NG and Adam for every ``(family, size)``.

    Args:
        families: keys of :data:`FAMILIES`.
        sizes: target parameter counts.
        repeats: timed calls per optimizer (halved, at least 3, for >= 3e6
            parameters).
        warmup: untimed calls first.
        memory: also run the (slower) isolated memory probes.
        rule_path: learned rule directory (``None``: the default rule).
        progress: show a progress bar.

    Returns:
        One row per ``(family, size)``: ``family``, ``width``, ``num_params``,
        ``ng`` and ``adam`` measurements, and ``ratio`` (NG / Adam).
    """
    rule = load_ng_rule(rule_path)
    grid = [(f, s) for f in families for s in sizes]
    rows = []
    for family, target in tqdm(grid, desc="sizes", disable=not progress):
        width = size_for(family, target)
        num_params = FAMILIES[family](width)
        reps = _repeats_for(num_params, repeats)
        row = {"family": family, "width": width, "num_params": num_params}
        row.update(_time_pair(family, width, rule, reps, warmup))
        gc.collect()
        if memory:
            for name in OPTIMIZERS:
                probe = run_isolated(
                    "benchmarks.optim.overhead",
                    "memory_probe",
                    {
                        "family": family,
                        "width": width,
                        "optimizer": name,
                        "rule": rule_path,
                        "threads": torch.get_num_threads(),
                    },
                )
                row[name].update(probe)
        row["ratio"] = {
            key: _ratio(row["ng"].get(key), row["adam"].get(key))
            for key in ("step_ms", "train_step_ms", "peak_bytes", "state_bytes")
        }
        rows.append(row)
    return rows


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _times(ratio: float | None) -> str:
    return "n/a" if ratio is None else f"{report.format_number(ratio)}x"


def markdown_report(results: dict) -> str:
    """Markdown table of an overhead measurement."""
    cfg = results["config"]
    headers = [
        "model",
        "params",
        "NG step ms",
        "Adam step ms",
        "step ratio",
        "NG train-step ms",
        "Adam train-step ms",
        "train ratio",
        "NG peak mem",
        "Adam peak mem",
        "mem ratio",
        "NG state",
        "Adam state",
    ]
    fmt, size = report.format_number, report.format_bytes
    rows = []
    for r in results["rows"]:
        ng, adam, ratio = r["ng"], r["adam"], r["ratio"]
        unit = "units" if r["family"] == "mlp" else "channels"
        rows.append(
            [
                f"{r['family']} ({r['width']} {unit})",
                f"{r['num_params']:.2e}",
                fmt(ng["step_ms"]),
                fmt(adam["step_ms"]),
                _times(ratio["step_ms"]),
                fmt(ng["train_step_ms"]),
                fmt(adam["train_step_ms"]),
                _times(ratio["train_step_ms"]),
                size(ng.get("peak_bytes")),
                size(adam.get("peak_bytes")),
                _times(ratio["peak_bytes"]),
                size(ng.get("state_bytes")),
                size(adam.get("state_bytes")),
            ]
        )
    method = next((r["ng"].get("method") for r in results["rows"]), None)
    return (
        "# NGOptimizer overhead vs torch.optim.Adam(foreach=True)\n\n"
        f"CPU, {cfg['torch_threads']} thread(s), torch {cfg['torch_version']}, "
        f"commit {str(cfg['git_commit'])[:10]}, {cfg['date']}. Times: median of "
        f"{cfg['repeats']} interleaved calls after {cfg['warmup']} warm-up calls "
        f"(train step = zero_grad + forward + backward + step, batch {BATCH}). "
        "Peak mem: RSS high-water mark added by the first optimizer step "
        f"(gradients fixed, state created), fresh process ({method}). State: "
        "bytes of the optimizer's persistent tensors (NG: momenta, second "
        "moment, the step-size adaptation's trace when the rule has one, and "
        "graph index).\n\n" + report.markdown_table(headers, rows) + "\n"
    )


def write_outputs(results: dict, out_dir: str | Path) -> dict[str, Path]:
    """Write ``overhead.json``, ``overhead.md`` and ``overhead.png``."""
    plot = partial(plot_overhead, results["rows"])
    return report.write_outputs(out_dir, "overhead", results, markdown_report, plot)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = quick_parser(
        "python -m benchmarks.optim.overhead", __doc__, "sizes up to 1e6, 5 repeats"
    )
    parser.add_argument("--sizes", help="comma-separated parameter counts")
    parser.add_argument("--families", default="mlp,cnn", help="mlp,cnn")
    parser.add_argument("--repeats", type=int, help="timed calls (default 10)")
    parser.add_argument("--no-memory", action="store_true", help="skip memory")
    add_common_arguments(parser)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    args = _parse(argv)
    torch.set_num_threads(args.threads)
    sizes = QUICK_SIZES if args.quick else FULL_SIZES
    if args.sizes:
        sizes = tuple(int(float(s)) for s in args.sizes.split(","))
    families = args.families.split(",")
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        print(f"error: Invalid family: {', '.join(unknown)}", file=sys.stderr)
        return 2
    try:
        load_ng_rule(args.rule)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    repeats = args.repeats or (5 if args.quick else 10)
    warmup = 2
    rows = measure_overhead(
        families,
        sizes,
        repeats=repeats,
        warmup=warmup,
        memory=not args.no_memory,
        rule_path=args.rule,
        progress=not args.no_progress,
    )
    results = {
        "benchmark": "overhead",
        "config": {
            "families": families,
            "sizes": list(sizes),
            "repeats": repeats,
            "warmup": warmup,
            "batch": BATCH,
            **run_metadata(args.rule, load_ng_rule(args.rule)),
        },
        "rows": rows,
    }
    save_and_print(results, output_dir(args), write_outputs, markdown_report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
