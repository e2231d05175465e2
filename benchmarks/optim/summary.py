"""One table comparing several ``compare`` results side by side (one row per
rule), e.g. every meta-training experiment's rule on the held-out suite.

Usage::

    python -m benchmarks.optim.summary LABEL=path/to/results.json [...] [--out FILE.md]

Each row: NG divergences, wins against Adam(1e-3), tuned Adam and each untuned
peer (Prodigy, Schedule-Free AdamW, LDoG, where the results have them) on
final train loss, the median speedup over tuned Adam, and the speedup on every
task.
The results should come from the same protocol (steps, seeds, grids); rows whose
protocol differs from the first one's are flagged.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from benchmarks.common.report import format_speedup, markdown_table, write_text
from benchmarks.optim.protocol import reference_name

__all__ = ["load_results", "summary_table", "main"]

_PROTOCOL_KEYS = ("steps", "seeds", "grids", "divergence_factor")


def load_results(path: str | Path) -> dict:
    """A ``compare`` results file (JSON; raises ``ValueError`` with the reason)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as err:
        raise ValueError(f"Invalid results file {path}: {err.strerror}") from err
    except ValueError as err:
        raise ValueError(f"Invalid results file {path}: not JSON ({err})") from err
    if not isinstance(data, dict) or data.get("benchmark") != "compare":
        raise ValueError(f"Invalid results file {path}: not a compare result")
    return data


def _protocol(results: dict) -> dict:
    return {k: results["config"].get(k) for k in _PROTOCOL_KEYS}


def _outcomes(results: dict) -> dict[str, dict[str, int]]:
    """NG's win / tie / loss counts per compared entry (older files: the Adams)."""
    agg = results["aggregate"]
    return agg.get("outcome_vs") or {
        "adam_default": agg["outcome_vs_adam_default"],
        "adam_tuned": agg["outcome_vs_adam_tuned"],
    }


def summary_table(entries: Sequence[tuple[str, dict]]) -> str:
    """Markdown table of ``(label, results)`` pairs (tasks and compared entries
    of the first; ``-`` where a row's results lack one)."""
    if not entries:
        raise ValueError("no results to summarise")
    tasks = [t["name"] for t in entries[0][1]["tasks"]]
    reference = _protocol(entries[0][1])
    versus = list(_outcomes(entries[0][1]))
    lr = entries[0][1]["config"].get("default_adam_lr")
    headers = ["rule", "NG div.", *(f"beats {reference_name(k, lr)}" for k in versus)]
    headers += ["median speedup vs tuned Adam", *tasks]
    rows = []
    for label, results in entries:
        agg = results["aggregate"]
        by_name = {t["name"]: t for t in results["tasks"]}
        runs = sum(t["entries"]["ng"]["runs"] for t in results["tasks"])
        median = agg["median_speedup_vs_adam_tuned"]
        flag = "" if _protocol(results) == reference else " (other protocol)"
        row = [
            label + flag,
            f"{agg['divergences_by_optimizer'].get('ng', 0)}/{runs}",
        ]
        outcomes = _outcomes(results)
        row += [
            f"{outcomes[k]['win']}/{agg['num_tasks']}" if k in outcomes else "-"
            for k in versus
        ]
        row += ["n/a" if median is None else f"{median:.2f}x"]
        for task in tasks:
            summary = by_name.get(task)
            row.append(
                "-"
                if summary is None
                else format_speedup(summary["speedup"].get("adam_tuned"))
            )
        rows.append(row)
    return markdown_table(headers, rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.optim.summary", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("results", nargs="+", help="LABEL=path/to/results.json")
    parser.add_argument("--out", help="also write the table to this Markdown file")
    args = parser.parse_args(argv)
    entries = []
    try:
        for item in args.results:
            label, sep, path = item.rpartition("=")
            if not sep or not label or not path:
                raise ValueError(f"Invalid argument {item!r}: expected LABEL=PATH")
            entries.append((label, load_results(path)))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    table = summary_table(entries)
    print(table)
    if args.out:
        print(f"saved markdown: {write_text(args.out, table + chr(10))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
