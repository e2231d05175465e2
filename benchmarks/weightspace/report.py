"""Reporting the weight-space benchmark: the issue's orderings checked on the
results, Markdown tables and the plot (pure functions of the results dict)."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path

import numpy as np

from benchmarks.common import report

__all__ = [
    "LABELS",
    "acceptance",
    "results_table",
    "pivot_table",
    "markdown_report",
    "plot_results",
    "write_outputs",
]

#: Display names of the models.
LABELS = {
    "ng_gnn": "NG-GNN",
    "ng_t": "NG-T",
    "ng_gnn_probes": "NG-GNN +probes",
    "ng_gnn_noact": "NG-GNN -act",
    "ng_gnn_sign": "NG-GNN +sign",
    "ng_gnn_stats": "NG-GNN +stats",
    "ng_gnn_stats_noact": "NG-GNN +stats -act",
    "ng_gnn_qstats": "NG-GNN +qstats",
    "ng_gnn_qstats_noact": "NG-GNN +qstats -act",
    "ng_gnn_qstats_ln": "NG-GNN +qstats +LN edges",
    "ng_gnn_qstats_ln_noact": "NG-GNN +qstats +LN edges -act",
    "nfn": "NFN (HNP)",
    "flat": "MLP (flat)",
    "flat_aug": "MLP (flat, perm. aug.)",
    "statnn": "StatNN (MLP)",
    "statnn_gbt": "StatNN (GBT)",
    "statnn_q": "StatNN (MLP, quantiles)",
    "probe": "Probe-only",
    "image": "Image classifier",
}


# ----------------------------------------------------------------- acceptance
def _get(results: dict, task: str, model: str) -> float | None:
    entry = results["tasks"].get(task, {}).get("models", {}).get(model)
    return None if entry is None else entry["mean"]


#: Models of this project beyond the issue's: their acceptance rows are listed
#: only when a run trained them.
_EXTRAS = ("ng_gnn_sign", "ng_gnn_stats", "ng_gnn_qstats")

#: StatNN's variants: the acceptance compares with the best of those run.
_STATNN = ("statnn", "statnn_gbt", "statnn_q")

#: The NG-GNN variants with neuron statistics, checked on the CNN zoos.
_STATS = ("ng_gnn_stats", "ng_gnn_qstats", "ng_gnn_qstats_ln")


def _ran(results: dict, task: str, models: Sequence[str]) -> list[str]:
    """``models`` less the extras that ``task`` did not train."""
    return [m for m in models if m not in _EXTRAS or _get(results, task, m) is not None]


def _best(
    results: dict, task: str, models: Sequence[str], higher: bool = True
) -> tuple[str, float] | None:
    found = [(m, _get(results, task, m)) for m in models]
    found = [(m, v) for m, v in found if v is not None]
    if not found:
        return None
    return (max if higher else min)(found, key=lambda mv: mv[1])


def acceptance(results: dict) -> list[dict]:
    """The issue's orderings, checked on the means over seeds. StatNN is the
    best of its variants that ran (MLP, GBT, MLP on quantile-scaled features:
    the strictest comparison)."""
    checks: list[dict] = []

    def add(
        claim: str, value: float | None, need: float, holds: bool | None, detail: str
    ):
        checks.append(
            {
                "claim": claim,
                "margin": value,
                "required": need,
                "holds": holds,
                "detail": detail,
            }
        )

    def margin(task, a, b, higher=True):
        va = _get(results, task, a) if isinstance(a, str) else a
        vb = b[1] if isinstance(b, tuple) else _get(results, task, b)
        if va is None or vb is None:
            return None
        return va - vb if higher else vb - va

    for task in ("inr_digits", "inr_mnist1d"):
        if task not in results["tasks"]:
            continue
        stat = _best(results, task, _STATNN)
        flat = _best(results, task, ("flat", "flat_aug"))
        for ng in _ran(results, task, ("ng_gnn", "ng_gnn_sign", "ng_t")):
            m = margin(task, ng, "nfn")
            add(
                f"{task}: {LABELS[ng]} >= NFN",
                m,
                0.0,
                None if m is None else m >= 0,
                "accuracy difference",
            )
            for name, ref in (("StatNN", stat), ("flat MLP", flat)):
                m = margin(task, ng, ref) if ref else None
                add(
                    f"{task}: {LABELS[ng]} well above {name}",
                    m,
                    0.05,
                    None if m is None else m >= 0.05,
                    "accuracy difference; 'well above' read as >= 5 points",
                )
        m = margin(task, "ng_gnn_probes", "ng_gnn")
        add(
            f"{task}: 64 probes add >= 3 points (NG-GNN)",
            m,
            0.03,
            None if m is None else m >= 0.03,
            "accuracy difference",
        )
        m = margin(task, "ng_gnn_probes", "probe")
        add(
            f"{task}: NG-GNN +probes > probe-only",
            m,
            0.0,
            None if m is None else m > 0,
            "accuracy difference",
        )
    if "edit_digits" in results["tasks"]:
        nfn = _get(results, "edit_digits", "nfn")
        for ng in ("ng_gnn", "ng_t"):
            v = _get(results, "edit_digits", ng)
            rel = None if v is None or not nfn else 1 - v / nfn
            add(
                f"edit_digits: {LABELS[ng]} MSE >= 7% below NFN",
                rel,
                0.07,
                None if rel is None else rel >= 0.07,
                "relative MSE reduction vs NFN",
            )
    if "cnn_digits" in results["tasks"]:
        stat = _best(results, "cnn_digits", _STATNN)
        for ng in _ran(results, "cnn_digits", ("ng_gnn", *_STATS, "ng_t")):
            m = margin("cnn_digits", ng, stat) if stat else None
            add(
                f"cnn_digits: {LABELS[ng]} tau >= StatNN + 0.015",
                m,
                0.015,
                None if m is None else m >= 0.015,
                "tau difference",
            )
            m = margin("cnn_digits", ng, "nfn")
            add(
                f"cnn_digits: {LABELS[ng]} tau >= NFN - 0.005",
                m,
                -0.005,
                None if m is None else m >= -0.005,
                "tau difference",
            )
    if "cnn_wild" in results["tasks"]:
        stat = _best(results, "cnn_wild", _STATNN)
        for ng in _ran(results, "cnn_wild", ("ng_gnn", *_STATS, "ng_t")):
            m = margin("cnn_wild", ng, stat) if stat else None
            add(
                f"cnn_wild: {LABELS[ng]} tau >= StatNN + 0.08 (unseen architectures)",
                m,
                0.08,
                None if m is None else m >= 0.08,
                "tau difference",
            )
        for ng in _ran(results, "cnn_wild", ("ng_gnn", *_STATS)):
            m = margin("cnn_wild", ng, f"{ng}_noact")
            add(
                "cnn_wild: removing the activation embedding costs >= 0.02 tau "
                f"({LABELS[ng]})",
                m,
                0.02,
                None if m is None else m >= 0.02,
                "tau difference",
            )
    return checks


# -------------------------------------------------------------------- report
def results_table(results: dict) -> str:
    """One Markdown table: task, model, test metric and train time (mean ±
    std over seeds)."""
    rows = []
    for task, entry in results["tasks"].items():
        for model in entry["models"].values():
            rows.append(
                [
                    task,
                    model["label"],
                    entry["metric"] + (" ↑" if entry["higher_is_better"] else " ↓"),
                    report.format_mean_std(model["mean"], model["std"]),
                    report.format_mean_std(
                        model["train_s_mean"], model["train_s_std"], 2
                    ),
                ]
            )
    return report.markdown_table(
        ["task", "model", "metric", "test (mean ± std)", "train s/fit"], rows, "lllrr"
    )


def pivot_table(results: dict) -> str:
    """Models as rows, tasks as columns: the test metric, mean ± std over
    seeds ("-" where a model does not run on a task)."""
    tasks = list(results["tasks"].items())
    keys: list[str] = []
    for _, entry in tasks:
        keys += [k for k in entry["models"] if k not in keys]
    headers = ["model"] + [
        f"{t} ({e['metric']} {'↑' if e['higher_is_better'] else '↓'})" for t, e in tasks
    ]
    rows = []
    for key in keys:
        row = [LABELS.get(key, key)]
        for _, entry in tasks:
            m = entry["models"].get(key)
            row.append(
                "-" if m is None else report.format_mean_std(m["mean"], m["std"])
            )
        rows.append(row)
    return report.markdown_table(headers, rows)


def _cap(limit) -> str:
    return "all" if limit is None else f"at most {limit}"


def markdown_report(results: dict) -> str:
    meta = results.get("provenance", {})
    s = results["settings"]
    lines = [
        "# Weight-space benchmark" + (" (quick)" if s["size"] == "quick" else ""),
        "",
        f"Command: `{meta.get('command', 'python -m benchmarks.weightspace')}`  ",
        f"Commit {meta.get('git_commit')}, {meta.get('date')}, {meta.get('machine')} "
        f"x{meta.get('cpu_count')} CPUs, {meta.get('torch_threads')} torch thread(s), "
        f"torch {meta.get('torch_version')}; wall time {results.get('wall_s')} s.",
        "",
        f"{s['seeds']} seeds; zoo size {s['size']}; {_cap(s['max_train'])} "
        f"training and {_cap(s['max_eval'])} validation / test networks per task; "
        f"up to {s['epochs']} epochs (patience {s['patience']}, "
        + (
            f"at most {s['max_seconds']} s per fit"
            if s["max_seconds"] is not None
            else "no time cap"
        )
        + f"), AdamW lr {s['lr']}"
        + (
            f" halved after every {s['lr_patience']} epochs without a better "
            "validation metric"
            if s.get("lr_patience")
            else ""
        )
        + (f", gradient norm clipped at {s['grad_clip']}" if s.get("grad_clip") else "")
        + f", batch {s['batch_size']}; best validation epoch "
        f"kept. NG models: {s.get('fourier', 0)} random Fourier features per "
        f"scalar weight, widths {s.get('node_dim', 32)}/{s.get('edge_dim', 8)} "
        f"(nodes/edges), {s.get('layers', 3)} layers, readout pooling "
        f"{s.get('pooling', 'mean')}.",
        "",
        "Zoos: "
        + "; ".join(
            f"{name} {z['networks']} networks"
            for name, z in results.get("zoos", {}).items()
        )
        + ". Split sizes per task: "
        + "; ".join(
            f"{t} {e['sizes']['train']}/{e['sizes']['val']}/{e['sizes']['test']}"
            for t, e in results["tasks"].items()
        )
        + " (train/val/test).",
        "",
        pivot_table(results),
        "",
        "Per task, with the training time of one fit:",
        "",
        results_table(results),
        "",
        *(
            f"{t}: an editor that changes nothing scores MSE "
            f"{report.format_number(e['no_edit_mse'])} on the same test networks."
            for t, e in results["tasks"].items()
            if "no_edit_mse" in e
        ),
        "",
        "## The issue's orderings (on the means above)",
        "",
    ]
    rows = []
    for check in results.get("acceptance", []):
        verdict = {True: "holds", False: "fails", None: "n/a"}[check["holds"]]
        rows.append(
            [
                check["claim"],
                report.format_number(check["margin"], 3),
                f"{check['required']:g}",
                verdict,
            ]
        )
    lines.append(
        report.markdown_table(
            ["ordering", "measured", "required", "verdict"], rows, "lrrl"
        )
    )
    lines.append("")
    return "\n".join(lines)


def plot_results(results: dict, path: Path) -> Path:
    """One panel per task: test metric per model, mean ± std over seeds."""
    from matplotlib.figure import Figure

    tasks = list(results["tasks"].items())
    fig = Figure(figsize=(4.2 * len(tasks), 3.6))
    for k, (task, entry) in enumerate(tasks):
        ax = fig.add_subplot(1, len(tasks), k + 1)
        names = [m["label"] for m in entry["models"].values()]
        means = [
            m["mean"] if m["mean"] is not None else np.nan
            for m in entry["models"].values()
        ]
        stds = [m["std"] or 0.0 for m in entry["models"].values()]
        colors = [
            "tab:blue" if key.startswith("ng") else "tab:gray"
            for key in entry["models"]
        ]
        ax.barh(range(len(names)), means, xerr=stds, color=colors)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.invert_yaxis()
        ax.set_title(task, fontsize=9)
        ax.set_xlabel(
            entry["metric"]
            + (" (higher better)" if entry["higher_is_better"] else " (lower better)"),
            fontsize=8,
        )
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def write_outputs(results: dict, out_dir: Path) -> dict[str, Path]:
    """``results.json``, ``results.md`` and ``results.png`` in ``out_dir``."""
    plot = partial(plot_results, results)
    return report.write_outputs(out_dir, "results", results, markdown_report, plot)
