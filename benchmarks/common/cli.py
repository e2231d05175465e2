"""Command-line pieces shared by the benchmark commands."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "RESULTS_DIR",
    "add_common_arguments",
    "add_peers_argument",
    "output_dir",
    "print_saved",
    "quick_parser",
    "run_moved",
    "save_and_print",
]

RESULTS_DIR = Path(__file__).resolve().parents[1] / "results"


def quick_parser(
    prog: str, doc: str, quick_help: str, **kwargs
) -> argparse.ArgumentParser:
    """A parser for command ``prog``, described by the first paragraph of
    its module docstring ``doc``, with a ``--quick`` flag (``quick_help``);
    ``kwargs`` go to :class:`argparse.ArgumentParser`."""
    parser = argparse.ArgumentParser(
        prog=prog, description=doc.split("\n\n")[0], **kwargs
    )
    parser.add_argument("--quick", action="store_true", help=quick_help)
    return parser


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


def save_and_print(
    results: dict,
    out: Path,
    write_outputs: Callable[[dict, Path], dict[str, Path]],
    markdown_report: Callable[[dict], str],
) -> None:
    """The end of a benchmark command: ``write_outputs(results, out)``, then
    ``markdown_report(results)`` and the paths written, on stdout."""
    paths = write_outputs(results, out)
    print()
    print(markdown_report(results))
    print_saved(paths)


def run_moved(name: str, new: str, note: bool = True) -> None:
    """Run command ``new`` for an old ``python -m`` command that moved there.

    Called from the old module with its ``__name__``; does nothing on import,
    so only ``python -m OLD`` runs ``new`` (with the same arguments), after a
    line on stderr saying where the command went (``note=False``: a short
    alias, run silently).
    """
    if name != "__main__":
        return
    import runpy

    if note:
        print(f"note: this command moved to `python -m {new}`", file=sys.stderr)
    runpy.run_module(new, run_name="__main__", alter_sys=True)
