"""``import lopt`` against ``import torch``, each in a fresh interpreter.

The two imports are timed side by side: every repeat starts one interpreter
per statement, in turn, so background load hits both. The first repeats only
warm the file cache and are not counted. The bar is ``import lopt`` at most
1.5x ``import torch``.

    python -m benchmarks.optim.import_time --repeats 10
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from benchmarks.common.cli import RESULTS_DIR, print_saved
from benchmarks.common.provenance import run_metadata

__all__ = ["STATEMENTS", "time_imports", "main"]

#: What is timed: the interpreter's own start-up is inside both figures, as a
#: user sees it (``python -c 'import lopt'``).
STATEMENTS = {"torch": "import torch", "lopt": "import lopt"}
BAR = 1.5


def _run_once(statement: str) -> float:
    """Seconds the import took inside a fresh interpreter (measured there, so
    process creation is left out; interpreter start-up is small and common)."""
    code = (
        "import time; _t = time.perf_counter(); "
        f"{statement}; print(time.perf_counter() - _t)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"{statement!r} failed:\n{result.stderr}")
    return float(result.stdout.strip().splitlines()[-1])


def time_imports(repeats: int, warmup: int = 2) -> dict[str, dict[str, float]]:
    """Median, minimum and maximum seconds of each statement in
    :data:`STATEMENTS`, alternating between them ``repeats`` times."""
    if repeats < 1:
        raise ValueError(f"Invalid repeats: {repeats}")
    for _ in range(warmup):
        for statement in STATEMENTS.values():
            _run_once(statement)
    samples: dict[str, list[float]] = {name: [] for name in STATEMENTS}
    for _ in range(repeats):
        for name, statement in STATEMENTS.items():
            samples[name].append(_run_once(statement))
    return {
        name: {
            "median_s": statistics.median(values),
            "min_s": min(values),
            "max_s": max(values),
            "repeats": len(values),
        }
        for name, values in samples.items()
    }


def _markdown(times: dict[str, dict[str, float]], ratio: float) -> str:
    lines = [
        "| statement | median | min | max |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, t in times.items():
        lines.append(
            f"| `{STATEMENTS[name]}` | {t['median_s']:.2f} s | {t['min_s']:.2f} s "
            f"| {t['max_s']:.2f} s |"
        )
    verdict = "holds" if ratio <= BAR else "missed"
    lines += [
        "",
        f"`import lopt` / `import torch` (medians): **{ratio:.2f}x** "
        f"(bar <= {BAR}x: {verdict}); {times['torch']['repeats']} repeats each, "
        "interleaved, each in a fresh interpreter.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.optim.import_time",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument(
        "--out", help=f"output directory (default: {RESULTS_DIR})", default=None
    )
    args = parser.parse_args(argv)
    times = time_imports(args.repeats)
    ratio = times["lopt"]["median_s"] / times["torch"]["median_s"]
    table = _markdown(times, ratio)
    print(table)
    out = Path(args.out) if args.out else RESULTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    command = "python -m benchmarks.optim.import_time " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    record = {
        "command": command.strip(),
        "times": times,
        "ratio": ratio,
        "bar": BAR,
        "metadata": run_metadata(),
    }
    paths = {"json": out / "import_time.json", "markdown": out / "import_time.md"}
    paths["json"].write_text(json.dumps(record, indent=2) + "\n")
    paths["markdown"].write_text(f"# Import time\n\n`{command.strip()}`\n\n{table}")
    print_saved(paths)
    return record


if __name__ == "__main__":
    main()
