"""NGOptimizer against Adam, untuned peers and tuned baselines on the held-out
suite.

Usage::

    python -m benchmarks.optim.compare [--quick] [--steps N] [--seeds K]
        [--grid-points G] [--peers all|none|a,b] [--tasks a,b] [--rule PATH]
        [--cache DIR] [--out DIR]

For every task of :mod:`lopt.tasks.suite`: ``NGOptimizer`` with the rule at its
defaults (never tuned), Adam at lr 1e-3, the untuned peers at their recommended
defaults (Prodigy, Schedule-Free AdamW, LDoG; ``--peers`` chooses), and Adam,
AdamW and SGD-momentum each at the best learning rate of a log-spaced grid
(best = fewest divergent seeds, then lowest mean final smoothed train loss).
Writes ``results.json`` (every run's curve, subsampled, and all summaries),
``results.md`` (tables) and ``loss_curves.png`` into ``--out`` and prints the
tables.

Full settings: 1000 steps, 3 seeds, 9-point grids (half-decade spacing over
four decades: Adam / AdamW 1e-4..1, SGD 1e-3..10). ``--quick``: 200 steps, 2
seeds, 5-point grids (decade spacing over the same range); a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

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
from benchmarks.optim.cache import RunCache
from benchmarks.optim.optimizers import (
    BASELINES,
    NG,
    PEER_SPECS,
    PEERS,
    UNTRAINED,
    MissingPeerError,
    check_peers,
    load_ng_rule,
    lr_grid,
    parse_peers,
    peer_version,
)
from benchmarks.optim.plotting import plot_loss_curves
from benchmarks.optim.protocol import (
    TIE_TOLERANCE,
    Protocol,
    entry_label,
    execute,
    reference_keys,
    reference_name,
    run_record,
    summarise_task,
)
from lopt.tasks.suite import TASKS, Task, get_tasks

__all__ = [
    "Settings",
    "FULL",
    "QUICK",
    "make_protocol",
    "run_compare",
    "aggregate",
    "markdown_report",
    "write_outputs",
    "main",
]

#: Column order of the tables (columns of entries no task has are left out).
ENTRY_ORDER = (
    "ng",
    UNTRAINED,
    "adam_default",
    *PEERS,
    "adam_tuned",
    "adamw_tuned",
    "sgd_tuned",
)


@dataclass(frozen=True)
class Settings:
    """Budget of a comparison.

    Attributes:
        steps: optimizer steps per run.
        seeds: number of seeds (``0 .. seeds - 1``).
        grid_points: learning rates per tuned baseline (0: none tuned).
        peers: untuned peers run beside NG and Adam(1e-3) (all by default).
        ablation: run NG's untrained ablation too (the shipped config with fresh
            weights: Adam plus the step-size controller).
    """

    steps: int
    seeds: int
    grid_points: int
    peers: tuple[str, ...] = PEERS
    ablation: bool = True


FULL = Settings(steps=1000, seeds=3, grid_points=9)
QUICK = Settings(steps=200, seeds=2, grid_points=5)


def make_protocol(settings: Settings) -> Protocol:
    """The protocol for ``settings``: every baseline of :data:`BASELINES` tuned,
    and the peers of ``settings``."""
    return Protocol(
        steps=settings.steps,
        seeds=tuple(range(settings.seeds)),
        grids={
            name: lr_grid(name, settings.grid_points)
            for name in BASELINES
            if settings.grid_points > 0
        },
        peers=settings.peers,
        ablation=settings.ablation,
    )


def run_compare(
    tasks: Sequence[Task],
    protocol: Protocol,
    *,
    rule_path: str | None = None,
    progress: bool = True,
    cache: RunCache | None = None,
) -> dict:
    """Run the comparison and return the JSON-ready results.

    Args:
        tasks: tasks to run.
        protocol: steps, seeds, grids and peers.
        rule_path: the learned rule's directory (``None``: the default rule).
        progress: show a progress bar over runs.
        cache: re-use (and store) finished baseline and peer runs, see
            :mod:`benchmarks.optim.cache`.

    Returns:
        ``{"benchmark", "config", "tasks": [summary + runs], "aggregate"}``.
    """
    rule = load_ng_rule(rule_path)
    start = time.perf_counter()
    runs = execute(tasks, protocol, rule=rule, progress=progress, cache=cache)
    summaries = []
    for task in tasks:
        summary = summarise_task(task, runs[task.name], protocol)
        summary["runs"] = [run_record(r) for r in runs[task.name]]
        summaries.append(summary)
    return {
        "benchmark": "compare",
        "config": {
            "steps": protocol.steps,
            "seeds": list(protocol.seeds),
            "grids": {k: list(v) for k, v in protocol.grids.items()},
            "ablation": protocol.ablation,
            "peers": {
                name: {**PEER_SPECS[name].settings(), "version": peer_version(name)}
                for name in protocol.peers
            },
            "default_adam_lr": protocol.default_adam_lr,
            "smoothing_fraction": protocol.smoothing,
            "smoothing_window": protocol.window,
            "divergence_factor": protocol.divergence_factor,
            "tasks": [t.name for t in tasks],
            **run_metadata(rule_path, rule),
        },
        "tasks": summaries,
        "aggregate": aggregate(summaries, time.perf_counter() - start),
    }


def _count_outcomes(summaries: Sequence[dict], key: str) -> dict[str, int]:
    counts = {"win": 0, "tie": 0, "loss": 0}
    for summary in summaries:
        if key in summary["outcome"]:
            counts[summary["outcome"][key]] += 1
    return counts


#: Held-out metrics closer than this (relative) are a tie.
METRIC_TIE_TOLERANCE = 1e-3


def metric_outcome(summary: dict, key: str) -> str | None:
    """``"win"``, ``"tie"`` or ``"loss"`` of NG against entry ``key`` by the
    task's held-out metric (its direction from the task), or ``None`` when
    either has no metric. A side without a finite metric loses."""
    entries = summary["entries"]
    if key not in entries or NG not in entries:
        return None
    ng, other = entries[NG].get("metric_mean"), entries[key].get("metric_mean")
    if ng is None or other is None:
        return None
    ng_ok, other_ok = math.isfinite(ng), math.isfinite(other)
    if not (ng_ok and other_ok):
        return "tie" if ng_ok == other_ok else ("win" if ng_ok else "loss")
    if abs(ng - other) <= METRIC_TIE_TOLERANCE * max(abs(ng), abs(other)):
        return "tie"
    better = ng > other if summary["metric"]["higher_is_better"] else ng < other
    return "win" if better else "loss"


def _count_metric_outcomes(summaries: Sequence[dict], key: str) -> dict[str, int]:
    counts = {"win": 0, "tie": 0, "loss": 0}
    for summary in summaries:
        result = metric_outcome(summary, key)
        if result is not None:
            counts[result] += 1
    return counts


def _outcome_keys(summaries: Sequence[dict]) -> list[str]:
    keys = {k for s in summaries for k in s["outcome"]}
    return [k for k in reference_keys(dict.fromkeys(keys)) if k in keys]


def aggregate(summaries: Sequence[dict], wall_s: float | None = None) -> dict:
    """Suite-level numbers: wins, median speedup and divergences.

    ``outcome_vs`` counts NG's wins, ties and losses against every entry it is
    compared with (Adam(1e-3), tuned Adam, each peer) by final train loss, and
    ``metric_outcome_vs`` the same by held-out metric; ``outcome_vs_adam_default``
    and ``outcome_vs_adam_tuned`` repeat the first two (older readers use them).

    Censored speedups (tuned Adam never reached NG's final loss) enter the
    median at their cap, so the median is then itself a lower bound.
    """
    speedups = [s["speedup"].get("adam_tuned") for s in summaries]
    known = [s for s in speedups if s is not None]
    divergences: dict[str, int] = {}
    for summary in summaries:
        for run in summary.get("runs", []):
            key = run["optimizer"]
            divergences[key] = divergences.get(key, 0) + int(run["diverged"])
    return {
        "num_tasks": len(summaries),
        "outcome_vs": {
            k: _count_outcomes(summaries, k) for k in _outcome_keys(summaries)
        },
        "metric_outcome_vs": {
            k: _count_metric_outcomes(summaries, k) for k in _outcome_keys(summaries)
        },
        "outcome_vs_adam_default": _count_outcomes(summaries, "adam_default"),
        "outcome_vs_adam_tuned": _count_outcomes(summaries, "adam_tuned"),
        "median_speedup_vs_adam_tuned": (
            statistics.median(s["value"] for s in known) if known else None
        ),
        "speedups_censored": sum(s["censored"] for s in known),
        "speedups_missing": len(speedups) - len(known),
        "divergences_by_optimizer": divergences,
        "divergences_total": sum(divergences.values()),
        "runs_total": sum(len(s.get("runs", [])) for s in summaries),
        "failures": [f"{s['name']}: {f}" for s in summaries for f in s["failures"]],
        "wall_s": wall_s,
    }


def _best(values: list[float | None], higher: bool) -> int | None:
    finite = [
        (v, i) for i, v in enumerate(values) if v is not None and math.isfinite(v)
    ]
    if not finite:
        return None
    return (max if higher else min)(finite)[1]


def _entry_keys(summaries: Sequence[dict]) -> list[str]:
    """The table's entry columns: those of :data:`ENTRY_ORDER` some task has."""
    return [k for k in ENTRY_ORDER if any(k in s["entries"] for s in summaries)]


def _entry_cells(
    summary: dict, keys: Sequence[str], mean_key: str, std_key: str, higher: bool
) -> list[str]:
    entries = [summary["entries"].get(k) for k in keys]
    best = _best([e[mean_key] if e else None for e in entries], higher)
    cells = []
    for i, (key, entry) in enumerate(zip(keys, entries)):
        if entry is None:
            cells.append("-")
            continue
        text = report.format_mean_std(entry[mean_key], entry[std_key])
        if i == best:
            text = f"**{text}**"
        if key.endswith("_tuned"):
            text += f" @{report.format_lr(entry['lr'])}"
            text += "†" if entry.get("lr_at_grid_edge") else ""
        if entry["divergences"]:
            text += f" ({entry['divergences']}/{entry['runs']} div.)"
        if entry.get("failures"):
            text += f" ({entry['failures']}/{entry['runs']} failed)"
        cells.append(text)
    return cells


def _reverse(speedup: dict | None) -> str:
    if speedup is None:
        return "n/a"
    value = speedup.get("to_baseline_final")
    return "never" if value is None else f"{value:.2f}x"


def _default_lr(summaries: Sequence[dict]) -> float | None:
    return summaries[0]["entries"]["adam_default"]["lr"] if summaries else None


def _headers(first: Sequence[str], summaries: Sequence[dict]) -> list[str]:
    lr = _default_lr(summaries)
    return [*first, *(entry_label(k, lr) for k in _entry_keys(summaries))]


def _peers_text(peers: dict) -> str:
    if not peers:
        return "no peers"
    parts = []
    for name, info in peers.items():
        kwargs = ", ".join(f"{k}={v:g}" for k, v in info["kwargs"].items())
        evaluated = {
            "schedulefree_x": "evaluated at x",
            "polynomial_average": "evaluated at its polynomial-decay average",
        }.get(info["evaluated_at"])
        details = "; ".join(t for t in (kwargs or "defaults", evaluated) if t)
        parts.append(
            f"{entry_label(name)} ({info['class']} {info['version']}: {details})"
        )
    return "peers at their defaults: " + ", ".join(parts)


def markdown_report(results: dict) -> str:
    """The Markdown tables of a comparison (per-task rows plus aggregates)."""
    cfg, summaries, agg = results["config"], results["tasks"], results["aggregate"]
    grids = ", ".join(
        f"{k}: {report.format_lr(min(v))}..{report.format_lr(max(v))} ({len(v)} pts)"
        for k, v in cfg["grids"].items()
    )
    lines = [
        "# NGOptimizer vs Adam on the held-out suite",
        "",
        f"{cfg['steps']} steps, seeds {cfg['seeds']}, lr grids {grids}; "
        f"rule `{cfg['rule_path']}`; lopt {cfg['lopt_version']}, "
        f"torch {cfg['torch_version']}, commit {str(cfg['git_commit'])[:10]}, "
        f"{cfg['date']}; {_peers_text(cfg.get('peers', {}))}.",
        "",
        "`*` = tuned per task (lr after `@`; `†` = at the edge of the grid); "
        "NG, NG untrained (its config with fresh weights), Adam(1e-3) and the "
        "peers are untuned; "
        "**bold** = best in the row; "
        "`div.` = diverged runs (non-finite loss or loss > "
        f"{cfg['divergence_factor']:g}x the initial loss).",
        "",
        f"## Final train loss (mean ± std over seeds of the mean of the last "
        f"{cfg['smoothing_window']} steps)",
        "",
    ]
    keys = _entry_keys(summaries)
    rows = [
        [s["name"], f"{s['num_params']:,}"]
        + _entry_cells(s, keys, "final_loss_mean", "final_loss_std", higher=False)
        for s in summaries
    ]
    lines += [report.markdown_table(_headers(["task", "params"], summaries), rows), ""]

    lines += ["## Held-out metric (mean ± std over seeds)", ""]
    rows = [
        [
            s["name"],
            s["metric"]["name"] + (" ↑" if s["metric"]["higher_is_better"] else " ↓"),
        ]
        + _entry_cells(
            s, keys, "metric_mean", "metric_std", s["metric"]["higher_is_better"]
        )
        for s in summaries
    ]
    lines += [report.markdown_table(_headers(["task", "metric"], summaries), rows), ""]

    lines += [
        "## Speedup, cost and divergences",
        "",
        "Speedup = steps the baseline needs to reach NG's final smoothed loss / "
        "steps NG needs (seed-mean smoothed curves); `>=` means the baseline "
        "never got there within the budget. `to Adam* final` = steps / steps NG "
        "needs to reach tuned Adam's final smoothed loss (`never`: NG does not).",
        "",
    ]
    rows = []
    for s in summaries:
        e = s["entries"]
        rows.append(
            [
                s["name"],
                report.format_speedup(s["speedup"].get("adam_tuned")),
                _reverse(s["speedup"].get("adam_tuned")),
                report.format_speedup(s["speedup"].get("adam_default")),
                report.format_number(e["ng"]["ms_per_step_mean"]),
                report.format_number(e["adam_default"]["ms_per_step_mean"]),
                report.format_number(e["ng"]["wall_s_mean"]),
                f"{s['divergences']['ng']}/{e['ng']['runs']}",
                f"{s['divergences']['all_runs']}/{len(s.get('runs', []))}",
            ]
        )
    headers = [
        "task",
        "speedup vs Adam*",
        "to Adam* final",
        "speedup vs Adam(1e-3)",
        "NG ms/step",
        "Adam ms/step",
        "NG s/run",
        "NG div.",
        "all div.",
    ]
    lines += [report.markdown_table(headers, rows), ""]

    median = agg["median_speedup_vs_adam_tuned"]
    median_text = "n/a" if median is None else f"{median:.2f}x"
    if agg["speedups_censored"]:
        median_text += f" (lower bound: {agg['speedups_censored']} censored)"
    by_opt = ", ".join(f"{k} {v}" for k, v in agg["divergences_by_optimizer"].items())
    n = agg["num_tasks"]
    outcomes = agg.get("outcome_vs") or {
        "adam_default": agg["outcome_vs_adam_default"],
        "adam_tuned": agg["outcome_vs_adam_tuned"],
    }
    beats = [
        f"{reference_name(key, _default_lr(summaries))} on **{c['win']}/{n}** tasks "
        f"({c['tie']} ties, {c['loss']} losses)"
        for key, c in outcomes.items()
    ]
    metric_beats = [
        f"{reference_name(key, _default_lr(summaries))} on **{c['win']}/{n}** "
        f"({c['tie']} ties, {c['loss']} losses)"
        for key, c in (agg.get("metric_outcome_vs") or {}).items()
    ]
    lines += [
        "## Aggregate",
        "",
        f"- NG beats (final train loss lower by > {TIE_TOLERANCE:.0%}) "
        + "; ".join(beats)
        + ".",
    ]
    if metric_beats:
        lines.append(
            "- By held-out metric (better by more than "
            f"{METRIC_TIE_TOLERANCE:.1%} relative), NG beats "
            + "; ".join(metric_beats)
            + "."
        )
    lines += [
        f"- Median speedup over tuned Adam: **{median_text}**.",
        f"- Divergences: **{agg['divergences_total']}** of {agg['runs_total']} runs "
        f"({by_opt}).",
    ]
    if agg.get("wall_s") is not None:
        lines.append(f"- Wall-clock: {agg['wall_s']:.0f} s for all runs.")
    if agg["failures"]:
        lines.append(f"- **{len(agg['failures'])} runs failed** with an exception:")
        lines += [f"  - {failure}" for failure in agg["failures"]]
    return "\n".join(lines) + "\n"


def write_outputs(results: dict, out_dir: str | Path) -> dict[str, Path]:
    """Write ``results.json``, ``results.md`` and ``loss_curves.png``."""
    plot = partial(plot_loss_curves, results["tasks"])
    return report.write_outputs(
        out_dir,
        "results",
        results,
        markdown_report,
        plot,
        plot_name="loss_curves.png",
        compact=True,
    )


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = quick_parser(
        "python -m benchmarks.optim.compare",
        __doc__,
        f"{QUICK.steps} steps, {QUICK.seeds} seeds, {QUICK.grid_points}-point "
        f"grids (default: {FULL.steps}, {FULL.seeds}, {FULL.grid_points})",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"tasks: {', '.join(TASKS)}",
    )
    parser.add_argument("--steps", type=int, help="steps per run (overrides)")
    parser.add_argument("--seeds", type=int, help="number of seeds (overrides)")
    parser.add_argument(
        "--grid-points",
        type=int,
        help="lr grid size (overrides); 0 runs no tuned baselines "
        "(NG, Adam(1e-3) and the peers only)",
    )
    add_peers_argument(parser)
    parser.add_argument(
        "--no-ablation",
        action="store_true",
        help="do not run NG's untrained ablation (Adam plus the step-size control)",
    )
    parser.add_argument("--tasks", help="comma-separated task names (default: all)")
    parser.add_argument(
        "--cache",
        help="directory of cached baseline and peer runs: re-used when present, filled "
        "otherwise, so comparing another rule re-runs only NGOptimizer",
    )
    add_common_arguments(parser)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    args = _parse(argv)
    base = QUICK if args.quick else FULL
    torch.set_num_threads(args.threads)
    try:
        settings = Settings(
            steps=args.steps or base.steps,
            seeds=args.seeds or base.seeds,
            grid_points=(
                base.grid_points if args.grid_points is None else args.grid_points
            ),
            peers=parse_peers(args.peers),
            ablation=not args.no_ablation,
        )
        tasks = get_tasks(args.tasks.split(",") if args.tasks else None)
        protocol = make_protocol(settings)
        load_ng_rule(args.rule)  # fail now, not after the first runs
        check_peers(settings.peers)  # likewise for a missing package
        cache = RunCache(args.cache) if args.cache else None
    except (ValueError, MissingPeerError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(
        f"compare: {len(tasks)} tasks x {len(protocol.seeds)} seeds x "
        f"{len(protocol.configs())} optimizer settings, {settings.steps} steps each",
        flush=True,
    )
    results = run_compare(
        tasks,
        protocol,
        rule_path=args.rule,
        progress=not args.no_progress,
        cache=cache,
    )
    if cache is not None:
        print(
            f"baseline and peer runs re-used from {args.cache}: {cache.hits}",
            flush=True,
        )
    save_and_print(results, output_dir(args), write_outputs, markdown_report)
    if results["aggregate"]["failures"]:
        print(f"{len(results['aggregate']['failures'])} runs failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
