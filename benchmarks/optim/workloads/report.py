"""Tables and plots of the workloads benchmark.

Tuned recipes are read at the learning rate with the best mean final
held-out metric (over seeds); a diverged run counts as the worst. Three
rankings, as AlgoPerf reads optimizers:

- **final**: the held-out metric after the full step budget;
- **equal wall-clock**: NG's metric at the training seconds tuned AdamW+cosine
  took for its whole run (NG's last evaluation within that time);
- **steps to target**: the first evaluated step at which NG reaches the best
  baseline's final metric.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from benchmarks.optim.workloads.recipes import DISPLAY, RECIPES
from benchmarks.optim.workloads.runner import RunRecord
from benchmarks.optim.workloads.spec import Workload

__all__ = ["summarise", "markdown", "plot"]

BASELINES = ("adamw", "muon", "schedulefree", "prodigy")
#: One colour per recipe in every panel (a recipe absent from a panel, Muon on
#: the ResNet, must not shift the others' colours).
COLORS = {
    "ng": "tab:blue",
    "ng_untrained": "tab:orange",
    "adamw": "tab:green",
    "muon": "tab:red",
    "schedulefree": "tab:purple",
    "prodigy": "tab:brown",
}


def _better(workload: Workload, a: float, b: float) -> bool:
    """Whether ``a`` is strictly better than ``b`` (NaN is worst)."""
    if math.isnan(a):
        return False
    if math.isnan(b):
        return True
    return a > b if workload.higher_is_better else a < b


def _mean(values: Sequence[float]) -> float:
    return (
        float(np.mean(values))
        if values and not any(map(math.isnan, values))
        else math.nan
    )


def summarise(records: list[RunRecord], workloads: Sequence[Workload]) -> dict:
    """Per workload and recipe: the chosen lr, its runs and their figures."""
    out: dict = {}
    for w in workloads:
        by_recipe: dict[str, dict] = {}
        runs = [r for r in records if r.workload == w.name]
        for recipe in RECIPES:
            by_lr = defaultdict(list)
            for r in runs:
                if r.recipe == recipe:
                    by_lr[r.lr].append(r)
            if not by_lr:
                continue
            scores = {
                lr: _mean([r.final(w.metric) for r in rs]) for lr, rs in by_lr.items()
            }
            best = None
            for lr, score in scores.items():
                if best is None or _better(w, score, scores[best]):
                    best = lr
            chosen = by_lr[best]
            finals = [r.final(w.metric) for r in chosen]
            by_recipe[recipe] = {
                "lr": best,
                "runs": chosen,
                "final": _mean(finals),
                "std": float(np.std(finals))
                if not any(map(math.isnan, finals))
                else math.nan,
                "val_loss": _mean([r.final("val_loss") for r in chosen]),
                "seconds": float(np.mean([r.seconds for r in chosen])),
                "diverged": sum(r.diverged_at is not None for r in chosen),
            }
        out[w.name] = {"workload": w, "recipes": by_recipe}
        out[w.name].update(_rankings(w, by_recipe))
    return out


def _metric_at(run: RunRecord, key: str, seconds: float) -> float:
    """``key`` at the last evaluation within ``seconds`` of training."""
    if run.diverged_at is not None or not run.evals:
        return math.nan
    value = run.evals[0][key] if run.eval_seconds[0] > seconds else math.nan
    for t, ev in zip(run.eval_seconds, run.evals):
        if t <= seconds:
            value = ev[key]
    return value


def _rankings(w: Workload, by_recipe: dict) -> dict:
    ng = by_recipe.get("ng")
    result: dict = {"equal_time": math.nan, "steps_to_target": None, "target": math.nan}
    if ng is None:
        return result
    adamw = by_recipe.get("adamw")
    if adamw is not None:
        result["equal_time"] = _mean(
            [_metric_at(r, w.metric, adamw["seconds"]) for r in ng["runs"]]
        )
    finals = [by_recipe[b]["final"] for b in BASELINES if b in by_recipe]
    target = math.nan
    for value in finals:
        if _better(w, value, target):
            target = value
    result["target"] = target
    if math.isnan(target) or any(r.diverged_at is not None for r in ng["runs"]):
        return result
    curves = np.array([[ev[w.metric] for ev in r.evals] for r in ng["runs"]])
    mean_curve = curves.mean(0)
    for step, value in zip(ng["runs"][0].eval_steps, mean_curve):
        if value == target or _better(w, float(value), target):
            result["steps_to_target"] = step
            break
    return result


def _fmt(value: float, std: float = math.nan) -> str:
    if math.isnan(value):
        return "div."
    text = f"{value:.4g}"
    return text if math.isnan(std) or std == 0 else f"{text} ± {std:.2g}"


def markdown(summary: dict, header: str) -> str:
    """The tables and the acceptance counts as Markdown."""
    recipes = [r for r in RECIPES if any(r in s["recipes"] for s in summary.values())]
    lines = [header, "", "## Final held-out metric (mean ± std over seeds)", ""]
    lines.append(
        "| workload | metric | " + " | ".join(DISPLAY[r] for r in recipes) + " |"
    )
    lines.append("| :--- | :--- |" + " ---: |" * len(recipes))
    for name, s in summary.items():
        w = s["workload"]
        cells = []
        best = None
        for r in recipes:
            if r in s["recipes"] and (
                best is None
                or _better(w, s["recipes"][r]["final"], s["recipes"][best]["final"])
            ):
                best = r
        for r in recipes:
            if r not in s["recipes"]:
                cells.append("")
                continue
            e = s["recipes"][r]
            cell = _fmt(e["final"], e["std"])
            if e["lr"] is not None:
                cell += f" @{e['lr']:g}"
            cells.append(f"**{cell}**" if r == best else cell)
        arrow = "↑" if w.higher_is_better else "↓"
        lines.append(f"| {name} | {w.metric} {arrow} | " + " | ".join(cells) + " |")
    lines += ["", "## Rankings of NG", ""]
    lines.append(
        "| workload | NG final | AdamW+cos* final | NG at AdamW's seconds | "
        "best baseline | NG steps to it | NG s / AdamW s |"
    )
    lines.append("| :--- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, s in summary.items():
        rec = s["recipes"]
        if "ng" not in rec:
            continue
        adamw = rec.get("adamw")
        has_target = any(b in rec for b in BASELINES)
        steps = s["steps_to_target"]
        cells = [
            _fmt(rec["ng"]["final"]),
            _fmt(adamw["final"]) if adamw else "",
            _fmt(s["equal_time"]) if adamw else "",
            _fmt(s["target"]) if has_target else "",
            ("not reached" if steps is None else str(steps)) if has_target else "",
            f"{rec['ng']['seconds'] / adamw['seconds']:.2f}x" if adamw else "",
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "## Counts", ""]
    lines += [f"- {line}" for line in counts(summary)]
    return "\n".join(lines) + "\n"


def counts(summary: dict) -> list[str]:
    """NG against each recipe: on how many workloads its final metric is better."""
    out = []
    n = len(summary)
    for other in ("adamw", "muon", "schedulefree", "prodigy", "ng_untrained"):
        both = [
            s
            for s in summary.values()
            if "ng" in s["recipes"] and other in s["recipes"]
        ]
        wins = sum(
            _better(
                s["workload"], s["recipes"]["ng"]["final"], s["recipes"][other]["final"]
            )
            for s in both
        )
        absent = f" ({n - len(both)} without it)" if len(both) < n else ""
        out.append(
            f"NG final metric better than {DISPLAY[other]} on {wins}/{len(both)}"
            + absent
        )
    no_worse = sum(
        1
        for s in summary.values()
        if "adamw" in s["recipes"]
        and not _better(s["workload"], s["recipes"]["adamw"]["final"], s["equal_time"])
    )
    out.append(
        f"NG at AdamW+cos*'s wall-clock no worse than AdamW+cos* on {no_worse}/{n}"
    )
    div = sum(
        r.diverged_at is not None
        for s in summary.values()
        if "ng" in s["recipes"]
        for r in s["recipes"]["ng"]["runs"]
    )
    runs = sum(
        len(s["recipes"]["ng"]["runs"])
        for s in summary.values()
        if "ng" in s["recipes"]
    )
    out.append(f"NG divergences: {div}/{runs} runs")
    return out


def plot(summary: dict, path: Path) -> Path:
    """Held-out metric against steps (top) and training seconds (bottom)."""
    from matplotlib.figure import Figure

    names = list(summary)
    fig = Figure(figsize=(3.6 * max(1, len(names)), 6.4))
    axes = fig.subplots(2, max(1, len(names)), squeeze=False)
    for col, name in enumerate(names):
        s = summary[name]
        w = s["workload"]
        for recipe, e in s["recipes"].items():
            runs = [r for r in e["runs"] if r.diverged_at is None and r.evals]
            if not runs:
                continue
            values = np.mean([[ev[w.metric] for ev in r.evals] for r in runs], axis=0)
            seconds = np.mean([r.eval_seconds for r in runs], axis=0)
            label = DISPLAY[recipe] + ("" if e["lr"] is None else f" {e['lr']:g}")
            style = "-" if recipe.startswith("ng") else "--"
            kwargs = {"label": label, "color": COLORS[recipe]}
            axes[0, col].plot(runs[0].eval_steps, values, style, **kwargs)
            axes[1, col].plot(seconds, values, style, **kwargs)
        axes[0, col].set_title(f"{name} ({w.metric})", fontsize=9)
        axes[0, col].set_xlabel("step")
        axes[1, col].set_xlabel("training seconds")
        if w.metric == "val_loss":
            for row in (0, 1):
                axes[row, col].set_yscale("log")
        axes[0, col].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
