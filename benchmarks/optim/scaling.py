"""Does NGOptimizer's advantage grow as networks get wider and deeper?

Usage::

    python -m benchmarks.optim.scaling [--quick] [--out DIR]

MLPs on ``mnist1d`` swept in width (2 hidden layers of 32 .. 1024 units) and in
depth (2 .. 12 hidden layers of 64 units); the shipped rule's meta-training saw
width <= 128 and depth <= 3 (validation: width <= 256). At each point:
NGOptimizer at its defaults, Adam at lr 1e-3, the untuned peers at their
recommended defaults (Prodigy, Schedule-Free AdamW, LDoG; ``--peers``
chooses) and Adam tuned over a small learning-rate grid, on the same seeds.
Reported: the ratio of final smoothed train losses (NG / baseline or peer, < 1
means NG is better), the speedup over each Adam (see
:mod:`benchmarks.optim.curves`), plus the held-out accuracy.

Full: 1000 steps, 2 seeds, widths 32..1024, depths 2..12, a 5-point grid
(3.2e-4..3.2e-2). ``--quick``: 150 steps, 1 seed, widths 32, 128, 512, depths
2, 6, 12, a 3-point grid (1e-3..1e-2); under a minute on 2 CPU cores.

Writes ``scaling.json``, ``scaling.md`` and ``scaling.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import report
from benchmarks.common.cli import (
    add_common_arguments,
    add_peers_argument,
    output_dir,
    quick_parser,
    save_and_print,
)
from benchmarks.common.provenance import run_metadata
from benchmarks.optim.optimizers import (
    PEERS,
    MissingPeerError,
    check_peers,
    load_ng_rule,
    parse_peers,
    peer_version,
)
from benchmarks.optim.plotting import plot_scaling
from benchmarks.optim.protocol import (
    Protocol,
    entry_label,
    execute,
    reference_keys,
    summarise_task,
)
from lopt.tasks import data as datasets
from lopt.tasks.suite import Task, mlp_task

__all__ = [
    "SweepSettings",
    "FULL",
    "QUICK",
    "sweep_tasks",
    "run_scaling",
    "markdown_report",
    "write_outputs",
    "main",
]

#: Width of every hidden layer in the depth sweep.
DEPTH_SWEEP_WIDTH = 64
#: Hidden layers in the width sweep.
WIDTH_SWEEP_DEPTH = 2
#: The baselines whose speedups are tabulated (loss ratios: also every peer).
BASELINE_KEYS = ("adam_default", "adam_tuned")


@dataclass(frozen=True)
class SweepSettings:
    """What a scaling run covers.

    Attributes:
        widths: hidden widths of the width sweep.
        depths: hidden-layer counts of the depth sweep.
        steps: optimizer steps per run.
        seeds: number of seeds.
        grid: Adam learning rates tried for "tuned Adam".
        shapes: ``(width, depth)`` MLPs of a third sweep that grows both at
            once (e.g. the meta-training size and 8x its width at 2x its depth).
        peers: untuned peers run at every point (all by default).
    """

    widths: tuple[int, ...]
    depths: tuple[int, ...]
    steps: int
    seeds: int
    grid: tuple[float, ...]
    shapes: tuple[tuple[int, int], ...] = ()
    peers: tuple[str, ...] = PEERS


def _log_grid(low: float, high: float, points: int) -> tuple[float, ...]:
    return tuple(float(f"{v:.3g}") for v in np.logspace(low, high, points))


FULL = SweepSettings(
    widths=(32, 64, 128, 256, 512, 1024),
    depths=(2, 3, 4, 6, 8, 12),
    steps=1000,
    seeds=2,
    grid=_log_grid(-3.5, -1.5, 5),
)
QUICK = SweepSettings(
    widths=(32, 128, 512),
    depths=(2, 6, 12),
    steps=150,
    seeds=1,
    grid=_log_grid(-3, -2, 3),
)


def sweep_tasks(settings: SweepSettings) -> dict[str, list[tuple[int, Task]]]:
    """The MLP tasks of each sweep: ``{"width": [(w, task)], "depth": [...]}``,
    plus ``"shape": [("WxD", task)]`` when ``settings.shapes`` is set."""
    widths = [
        (
            w,
            mlp_task(
                f"mnist1d_width_{w}",
                datasets.mnist1d,
                [w] * WIDTH_SWEEP_DEPTH,
                description=f"mnist1d, MLP {WIDTH_SWEEP_DEPTH}x{w}",
            ),
        )
        for w in settings.widths
    ]
    depths = [
        (
            d,
            mlp_task(
                f"mnist1d_depth_{d}",
                datasets.mnist1d,
                [DEPTH_SWEEP_WIDTH] * d,
                description=f"mnist1d, MLP {d}x{DEPTH_SWEEP_WIDTH}",
            ),
        )
        for d in settings.depths
    ]
    shapes = [
        (
            f"{w}x{d}",
            mlp_task(
                f"mnist1d_shape_{w}x{d}",
                datasets.mnist1d,
                [w] * d,
                description=f"mnist1d, MLP {d}x{w}",
            ),
        )
        for w, d in settings.shapes
    ]
    sweeps = {"width": widths, "depth": depths}
    if shapes:
        sweeps["shape"] = shapes
    return sweeps


def _ratio(a: float, b: float) -> float | None:
    return a / b if np.isfinite(a) and np.isfinite(b) and b > 0 else None


def _point(value: int, summary: dict) -> dict:
    entries = summary["entries"]
    ng_loss = entries["ng"]["final_loss_mean"]
    versus = reference_keys(entries)
    return {
        "value": value,
        "task": summary["name"],
        "num_params": summary["num_params"],
        "final_loss": {k: e["final_loss_mean"] for k, e in entries.items()},
        "metric": {k: e["metric_mean"] for k, e in entries.items()},
        "lr": {k: e["lr"] for k, e in entries.items()},
        "lr_at_grid_edge": bool(entries["adam_tuned"].get("lr_at_grid_edge")),
        "divergences": {k: e["divergences"] for k, e in entries.items()},
        "ms_per_step": {k: e["ms_per_step_mean"] for k, e in entries.items()},
        "loss_ratio": {
            k: _ratio(ng_loss, entries[k]["final_loss_mean"]) for k in versus
        },
        "speedup": {k: summary["speedup"].get(k) for k in versus},
        "failures": summary["failures"],
    }


def run_scaling(
    settings: SweepSettings, *, rule_path: str | None = None, progress: bool = True
) -> dict:
    """Run both sweeps and return the JSON-ready results.

    Returns:
        ``{"benchmark", "config", "sweeps": {"width": points, "depth": points}}``
        where each point holds final losses, held-out accuracies, the tuned
        learning rate, loss ratios (against both Adams and every peer) and
        speedups.
    """
    rule = load_ng_rule(rule_path)
    protocol = Protocol(
        steps=settings.steps,
        seeds=tuple(range(settings.seeds)),
        grids={"adam": settings.grid},
        peers=settings.peers,
    )
    sweeps = sweep_tasks(settings)
    tasks = [task for points in sweeps.values() for _, task in points]
    start = time.perf_counter()
    runs = execute(tasks, protocol, rule=rule, progress=progress)
    results = {
        name: [
            _point(value, summarise_task(task, runs[task.name], protocol))
            for value, task in points
        ]
        for name, points in sweeps.items()
    }
    return {
        "benchmark": "scaling",
        "config": {
            "widths": list(settings.widths),
            "depths": list(settings.depths),
            "shapes": [list(shape) for shape in settings.shapes],
            "width_sweep_depth": WIDTH_SWEEP_DEPTH,
            "depth_sweep_width": DEPTH_SWEEP_WIDTH,
            "steps": settings.steps,
            "seeds": list(protocol.seeds),
            "adam_grid": list(settings.grid),
            "peers": {name: peer_version(name) for name in settings.peers},
            "smoothing_window": protocol.window,
            "wall_s": time.perf_counter() - start,
            **run_metadata(rule_path, rule),
        },
        "sweeps": results,
    }


def _peers_text(peers: dict) -> str:
    if not peers:
        return "none"
    return ", ".join(f"{entry_label(k)} {v}" for k, v in peers.items())


def _to_final(speedup: dict | None) -> str:
    if speedup is None or speedup.get("to_baseline_final") is None:
        return "never" if speedup else "n/a"
    return f"{speedup['to_baseline_final']:.2f}x"


def _peer_keys(points: Sequence[dict]) -> list[str]:
    return [k for k in points[0]["loss_ratio"] if k not in BASELINE_KEYS]


def _sweep_table(name: str, points: Sequence[dict]) -> str:
    fmt = report.format_number
    peers = _peer_keys(points)
    headers = [
        name,
        "params",
        "NG loss",
        "Adam(1e-3) loss",
        "Adam* loss",
        "Adam* lr",
        "NG / Adam(1e-3)",
        "NG / Adam*",
        *(f"NG / {entry_label(k)}" for k in peers),
        "speedup vs Adam(1e-3)",
        "speedup vs Adam*",
        "to Adam* final",
        "NG acc",
        "Adam* acc",
    ]
    rows = [
        [
            p["value"],
            f"{p['num_params']:,}",
            fmt(p["final_loss"]["ng"]),
            fmt(p["final_loss"]["adam_default"]),
            fmt(p["final_loss"]["adam_tuned"]),
            report.format_lr(p["lr"]["adam_tuned"])
            + ("†" if p["lr_at_grid_edge"] else ""),
            fmt(p["loss_ratio"]["adam_default"]),
            fmt(p["loss_ratio"]["adam_tuned"]),
            *(fmt(p["loss_ratio"].get(k)) for k in peers),
            report.format_speedup(p["speedup"]["adam_default"]),
            report.format_speedup(p["speedup"]["adam_tuned"]),
            _to_final(p["speedup"]["adam_tuned"]),
            fmt(p["metric"]["ng"]),
            fmt(p["metric"]["adam_tuned"]),
        ]
        for p in points
    ]
    return report.markdown_table(headers, rows)


def _trend(name: str, points: Sequence[dict]) -> str:
    first, last = points[0], points[-1]
    parts = []
    for key in first["loss_ratio"]:
        a, b = first["loss_ratio"][key], last["loss_ratio"].get(key)
        label = entry_label(key, first["lr"]["adam_default"])
        parts.append(
            f"vs {label} {report.format_number(a)} -> {report.format_number(b)}"
        )
    return (
        f"- {name} {first['value']} -> {last['value']}: final-loss ratio NG / "
        f"baseline {'; '.join(parts)} (< 1: NG better)."
    )


def markdown_report(results: dict) -> str:
    """Markdown tables of a scaling run, one per sweep, plus the trends."""
    cfg = results["config"]
    lines = [
        "# NGOptimizer vs Adam as MLPs grow (mnist1d)",
        "",
        f"{cfg['steps']} steps, seeds {cfg['seeds']}, tuned Adam over "
        f"{', '.join(report.format_lr(x) for x in cfg['adam_grid'])}; final loss = "
        f"mean of the last {cfg['smoothing_window']} steps, seed mean; rule "
        f"`{cfg['rule_path']}`; commit {str(cfg['git_commit'])[:10]}, {cfg['date']}. "
        "The shipped rule's meta-training saw width <= 128 and depth <= 3 "
        "(validation: width <= 256). "
        f"Peers (untuned, their defaults): {_peers_text(cfg.get('peers', {}))}. "
        "`†`: tuned lr at the edge "
        "of the grid. Speedup as in `compare`; `to Adam* final` = steps / steps NG "
        "needs to reach tuned Adam's final loss.",
        "",
    ]
    sweeps = results["sweeps"]
    if sweeps.get("width"):
        lines += [
            f"## Width ({cfg['width_sweep_depth']} hidden layers)",
            "",
            _sweep_table("width", sweeps["width"]),
            "",
        ]
    if sweeps.get("depth"):
        lines += [
            f"## Depth (hidden layers of {cfg['depth_sweep_width']})",
            "",
            _sweep_table("depth", sweeps["depth"]),
            "",
        ]
    if sweeps.get("shape"):
        lines += [
            "## Width and depth together (width x hidden layers)",
            "",
            _sweep_table("shape", sweeps["shape"]),
            "",
        ]
    lines += ["## Trends", ""]
    lines += [_trend(name, points) for name, points in sweeps.items() if points]
    failures = [
        f"{p['task']}: {f}"
        for points in sweeps.values()
        for p in points
        for f in p["failures"]
    ]
    if failures:
        lines += ["", f"**{len(failures)} runs failed** with an exception:", ""]
        lines += [f"- {failure}" for failure in failures]
    return "\n".join(lines) + "\n"


def write_outputs(results: dict, out_dir: str | Path) -> dict[str, Path]:
    """Write ``scaling.json``, ``scaling.md`` and ``scaling.png``."""
    plot = partial(plot_scaling, results["sweeps"])
    return report.write_outputs(out_dir, "scaling", results, markdown_report, plot)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def _shapes(text: str) -> tuple[tuple[int, int], ...]:
    shapes = []
    for item in text.split(","):
        width, sep, depth = item.strip().partition("x")
        if not sep or not width.isdigit() or not depth.isdigit():
            raise argparse.ArgumentTypeError(
                f"invalid shape {item.strip()!r} (expected WIDTHxDEPTH, e.g. 1024x6)"
            )
        shapes.append((int(width), int(depth)))
    return tuple(shapes)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = quick_parser(
        "python -m benchmarks.optim.scaling",
        __doc__,
        f"{QUICK.steps} steps, {QUICK.seeds} seed, widths {QUICK.widths}, "
        f"depths {QUICK.depths}",
    )
    parser.add_argument("--widths", type=_ints, help="comma-separated widths")
    parser.add_argument("--depths", type=_ints, help="comma-separated depths")
    parser.add_argument(
        "--shapes",
        type=_shapes,
        default=(),
        help="comma-separated WIDTHxDEPTH MLPs growing both at once, e.g. "
        "128x3,1024x6 (default: none)",
    )
    parser.add_argument("--steps", type=int, help="steps per run (overrides)")
    parser.add_argument("--seeds", type=int, help="number of seeds (overrides)")
    add_peers_argument(parser)
    add_common_arguments(parser)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    args = _parse(argv)
    base = QUICK if args.quick else FULL
    settings = SweepSettings(
        widths=base.widths if args.widths is None else args.widths,
        depths=base.depths if args.depths is None else args.depths,
        steps=args.steps or base.steps,
        seeds=args.seeds or base.seeds,
        grid=base.grid,
        shapes=args.shapes,
    )
    torch.set_num_threads(args.threads)
    try:
        settings = dataclasses.replace(settings, peers=parse_peers(args.peers))
        load_ng_rule(args.rule)  # fail now, not after the first runs
        check_peers(settings.peers)  # likewise for a missing package
    except (ValueError, MissingPeerError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    results = run_scaling(settings, rule_path=args.rule, progress=not args.no_progress)
    save_and_print(results, output_dir(args), write_outputs, markdown_report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
