"""Figures of the benchmarks, drawn from the JSON-ready results.

Every function takes the same dicts that are written to the JSON files, so a
figure can be redrawn from a saved ``results.json`` without re-running
anything. Matplotlib's object API (``Figure``) is used directly: no pyplot, no
global backend state, safe on a headless machine.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from benchmarks.common.report import format_lr
from benchmarks.optim import curves
from benchmarks.optim.protocol import entry_label

__all__ = [
    "ENTRY_COLORS",
    "ENTRY_STYLES",
    "plot_loss_curves",
    "plot_overhead",
    "plot_scaling",
]

#: Colour of each summary entry, shared by all figures.
ENTRY_COLORS = {
    "ng": "tab:red",
    "untrained": "tab:pink",
    "adam_default": "tab:gray",
    "adam_tuned": "tab:blue",
    "adamw_tuned": "tab:green",
    "sgd_tuned": "tab:purple",
    "prodigy": "tab:orange",
    "schedulefree": "tab:cyan",
    "ldog": "tab:brown",
}
#: Line style of each summary entry (solid when absent): the untuned peers are
#: dash-dotted, apart from the tuned baselines, and NG's untrained ablation dotted
#: (diverged runs are dashed).
ENTRY_STYLES = {"prodigy": "-.", "schedulefree": "-.", "ldog": "-.", "untrained": ":"}
_FLOOR = 1e-12  # log axes cannot show zero losses


def _plain_log_labels(ax) -> None:
    """Plain numbers (0.5, not 5 x 10^-1) on a log y axis; minor ticks are
    labelled when the axis spans under one decade (2 and 5 under two)."""

    def minor(value: float, _) -> str:
        low, high = ax.get_ylim()
        decades = math.log10(high / low) if low > 0 else math.inf
        mantissa = round(value / 10 ** math.floor(math.log10(value) + 1e-9))
        if decades < 1 or (decades < 2 and mantissa in (2, 5)):
            return f"{value:g}"
        return ""

    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(minor))
    ax.tick_params(which="both", labelsize=7)


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def _entry_curves(task: dict, entry: dict):
    """Smoothed subsampled curves of the runs of one entry.

    Returns:
        ``(complete, diverged)``: lists of ``(steps, values)``.
    """
    complete, diverged = [], []
    for run in task["runs"]:
        if run["optimizer"] != entry["optimizer"] or run["lr"] != entry["lr"]:
            continue
        steps = np.asarray(run["curve"]["step"])
        values = np.asarray(run["curve"]["loss"], dtype=np.float64)
        if values.size == 0:
            continue
        window = curves.smoothing_window(values.size)
        values = np.maximum(curves.smooth(values, window), _FLOOR)
        incomplete = run["diverged"] or run.get("error")
        (diverged if incomplete else complete).append((steps, values))
    return complete, diverged


def plot_loss_curves(
    tasks: Sequence[dict], path: str | os.PathLike, columns: int = 3
) -> Path:
    """One panel per task: smoothed train loss of every entry, log scale.

    Lines are seed means, shading spans the seeds' minimum to maximum, and a
    dashed line ending in a cross marks a diverged run.

    Args:
        tasks: task summaries (as from :func:`benchmarks.optim.protocol.summarise_task`)
            each with its ``runs`` records.
        path: PNG file to write.
        columns: panels per row.
    """
    columns = max(1, min(columns, len(tasks)))
    rows = max(1, math.ceil(len(tasks) / columns))
    fig = Figure(figsize=(4.2 * columns, 3.2 * rows), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax, task in zip(axes, tasks):
        for key, entry in task["entries"].items():
            color = ENTRY_COLORS.get(key, "black")
            label = entry_label(key, entry["lr"])
            if key.endswith("_tuned"):
                label += f" lr={format_lr(entry['lr'])}"
            complete, diverged = _entry_curves(task, entry)
            if complete:
                length = min(len(v) for _, v in complete)
                stack = np.stack([v[:length] for _, v in complete])
                steps = complete[0][0][:length]
                # NG on top: it is the subject and may overlap a baseline.
                z = 3 if key == "ng" else 2
                ax.plot(
                    steps,
                    stack.mean(0),
                    color=color,
                    ls=ENTRY_STYLES.get(key, "-"),
                    label=label,
                    lw=1.4,
                    zorder=z,
                )
                if len(complete) > 1:
                    ax.fill_between(
                        steps, stack.min(0), stack.max(0), color=color, alpha=0.15
                    )
            for steps, values in diverged:
                ax.plot(steps, values, color=color, ls="--", lw=0.8)
                ax.plot(steps[-1:], values[-1:], "x", color=color)
                if not complete:
                    ax.plot([], [], color=color, ls="--", label=f"{label} (diverged)")
        ax.set_yscale("log")
        _plain_log_labels(ax)
        ax.set_title(task["description"], fontsize=8)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel("train loss (smoothed)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3, which="both", lw=0.4)
        ax.legend(fontsize=6)
    for ax in axes[len(tasks) :]:
        ax.set_visible(False)
    return _save(fig, path)


def plot_overhead(rows: Sequence[dict], path: str | os.PathLike) -> Path:
    """Log-log step time and peak memory against parameter count.

    Args:
        rows: overhead measurements (as from
            :func:`benchmarks.optim.overhead.measure_overhead`), one per
            ``(family, size)`` with per-optimizer timings and memory.
        path: PNG file to write.
    """
    families = list(dict.fromkeys(r["family"] for r in rows))
    panels = [
        ("step_ms", "optimizer step (ms)", 1.0),
        ("train_step_ms", "forward + backward + step (ms)", 1.0),
        ("peak_bytes", "step memory, MiB (solid: peak, dashed: state)", 2.0**-20),
    ]
    fig = Figure(figsize=(4.2 * len(panels), 3.4), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False).ravel()
    styles = {"ng": ("tab:red", "NG"), "adam": ("tab:blue", "Adam(foreach)")}
    markers = ["o", "s", "^", "D"]
    for ax, (key, title, scale) in zip(axes, panels):
        for marker, family in zip(markers, families):
            fam = [r for r in rows if r["family"] == family]
            params = [r["num_params"] for r in fam]
            for opt, (color, name) in styles.items():
                series = [(key, "-", f"{name} {family}")]
                if key == "peak_bytes":
                    series.append(("state_bytes", "--", None))
                for field, style, label in series:
                    values = [r[opt].get(field) for r in fam]
                    pts = [
                        (p, v * scale)
                        for p, v in zip(params, values)
                        if v is not None and v > 0
                    ]
                    if pts:
                        xs, ys = zip(*pts)
                        ax.plot(
                            xs, ys, ls=style, marker=marker, color=color, label=label
                        )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("parameters", fontsize=8)
        ax.set_title(title, fontsize=9)
        _plain_log_labels(ax)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3, which="both", lw=0.4)
        ax.legend(fontsize=6)
    return _save(fig, path)


def plot_scaling(sweeps: dict[str, list[dict]], path: str | os.PathLike) -> Path:
    """Loss ratio and speedup against width and depth.

    Args:
        sweeps: ``{"width": points, "depth": points}``; each point has the
            swept ``value``, ``loss_ratio`` and ``speedup`` dicts keyed by
            baseline (``adam_default``, ``adam_tuned``, and each peer's name).
            Loss ratios are drawn against every baseline and peer, speedups
            against the two Adams.
        path: PNG file to write.
    """
    names = [n for n in ("width", "depth") if sweeps.get(n)]
    fig = Figure(figsize=(4.4 * max(1, len(names)), 6.4), layout="constrained")
    axes = fig.subplots(2, max(1, len(names)), squeeze=False)
    for col, name in enumerate(names):
        points = sweeps[name]
        xs = [p["value"] for p in points]
        for key in points[0]["loss_ratio"]:
            ratio = [p["loss_ratio"].get(key) for p in points]
            axes[0, col].plot(
                xs,
                [np.nan if r is None else r for r in ratio],
                marker="o",
                ls=ENTRY_STYLES.get(key, "-"),
                color=ENTRY_COLORS[key],
                label="vs " + entry_label(key, points[0]["lr"].get(key)),
            )
        for key in ("adam_default", "adam_tuned"):
            color = ENTRY_COLORS[key]
            label = "vs " + entry_label(key, points[0]["lr"].get(key))
            speed = [p["speedup"].get(key) for p in points]
            values = [np.nan if s is None else s["value"] for s in speed]
            axes[1, col].plot(xs, values, "o-", color=color, label=label)
            reverse = [
                np.nan
                if s is None or s.get("to_baseline_final") is None
                else s["to_baseline_final"]
                for s in speed
            ]
            axes[1, col].plot(
                xs,
                reverse,
                "s--",
                color=color,
                alpha=0.6,
                ms=4,
                label=f"{label}, to its final loss",
            )
            for x, s in zip(xs, speed):
                if s is not None and s["censored"]:
                    axes[1, col].annotate(
                        "\u2265",
                        (x, s["value"]),
                        fontsize=8,
                        color=color,
                        ha="center",
                        va="bottom",
                    )
        axes[0, col].axhline(1.0, color="black", lw=0.6)
        axes[1, col].axhline(1.0, color="black", lw=0.6)
        axes[0, col].set_ylabel("final loss NG / baseline (<1: NG better)", fontsize=8)
        axes[1, col].set_ylabel(
            "speedup of NG (>1: NG faster; \u2265: lower bound)", fontsize=8
        )
        for ax in axes[:, col]:
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(xs, [str(x) for x in xs])
            ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
            _plain_log_labels(ax)
            ax.set_xlabel(f"MLP {name}", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3, which="both", lw=0.4)
            ax.legend(fontsize=7)
    return _save(fig, path)
