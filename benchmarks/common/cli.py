"""Command-line pieces shared by the benchmark commands."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = [
    "RESULTS_DIR",
    "add_common_arguments",
    "add_peers_argument",
    "output_dir",
    "print_saved",
    "run_moved",
]

RESULTS_DIR = Path(__file__).resolve().parents[1] / "results"


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """``--rule``, ``--out``, ``--threads`` and ``--no-progress``."""
    parser.add_argument("--rule", help="learned rule directory (default: shipped)")
    parser.add_argument(
        "--out",
        help="output directory (default: benchmarks/results, or benchmarks/results/"
        "quick with --quick, so a quick run never overwrites the full results)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_peers_argument(parser: argparse.ArgumentParser) -> None:
    """``--peers``: which untuned peers run (parse with
    :func:`benchmarks.optim.optimizers.parse_peers`)."""
    parser.add_argument(
        "--peers",
        default="all",
        help="untuned peer optimizers run beside NG and Adam(1e-3): all "
        "(default: prodigy,schedulefree,ldog), none, or a comma-separated list; "
        "they need the bench extra (pip install -e '.[bench]')",
    )


def output_dir(args: argparse.Namespace) -> Path:
    """``--out``, or the default results folder for a full or ``--quick`` run."""
    if args.out:
        return Path(args.out)
    return RESULTS_DIR / "quick" if getattr(args, "quick", False) else RESULTS_DIR


def print_saved(paths: dict[str, Path]) -> None:
    for kind, path in paths.items():
        print(f"saved {kind}: {path}")


def run_moved(name: str, new: str) -> None:
    """Run command ``new`` for an old ``python -m`` command that moved there.

    Called from the old module with its ``__name__``; does nothing on import,
    so only ``python -m OLD`` runs ``new`` (with the same arguments), after a
    line on stderr saying where the command went.
    """
    if name != "__main__":
        return
    import runpy

    print(f"note: this command moved to `python -m {new}`", file=sys.stderr)
    runpy.run_module(new, run_name="__main__", alter_sys=True)
