"""Writing results: JSON files and Markdown tables, and number formatting.

JSON is strict (``nan`` and ``inf`` become ``null``) so any reader can load it;
files are written to a temporary name and renamed, so an interrupted benchmark
never leaves a half-written result behind.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "json_safe",
    "write_json",
    "write_text",
    "write_outputs",
    "markdown_table",
    "format_lr",
    "format_number",
    "format_mean_std",
    "format_speedup",
    "format_bytes",
]


def json_safe(obj: Any) -> Any:
    """Recursively replace non-finite floats by ``None`` and tuples by lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` atomically (temporary file + rename); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; use the usual mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_json(path: str | os.PathLike, obj: Any, compact: bool = False) -> Path:
    """Write ``obj`` as strict JSON (atomically); returns the path.

    Args:
        path: target file.
        obj: JSON-ready data; non-finite floats become ``null``.
        compact: one line without spaces (for files dominated by curves),
            instead of indented.
    """
    obj = json_safe(obj)
    if compact:
        text = json.dumps(obj, separators=(",", ":"), allow_nan=False)
    else:
        text = json.dumps(obj, indent=1, allow_nan=False)
    return write_text(path, text + "\n")


def write_outputs(
    out_dir: str | os.PathLike,
    stem: str,
    results: Any,
    markdown_report: Callable[[Any], str],
    plot: Callable[[Path], Path],
    plot_name: str | None = None,
    compact: bool = False,
) -> dict[str, Path]:
    """A benchmark's result files in ``out_dir``: ``results`` as
    ``{stem}.json`` (see :func:`write_json` for ``compact``), their
    ``markdown_report`` as ``{stem}.md`` and the figure ``plot(path)`` draws
    at ``plot_name`` (default ``{stem}.png``). Returns their paths by kind."""
    out = Path(out_dir)
    return {
        "json": write_json(out / f"{stem}.json", results, compact=compact),
        "markdown": write_text(out / f"{stem}.md", markdown_report(results)),
        "plot": plot(out / (plot_name or f"{stem}.png")),
    }


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def markdown_table(
    headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None
) -> str:
    """A GitHub-flavoured Markdown table.

    Args:
        headers: column headings.
        rows: one sequence of cells per row (converted with ``str``).
        align: one character per column, ``l`` or ``r`` (default: first column
            left, the rest right).
    """
    align = align or "l" + "r" * (len(headers) - 1)
    if len(align) != len(headers):
        raise ValueError(f"Invalid align: {align!r} for {len(headers)} columns")
    rule = ["---:" if a == "r" else ":---" for a in align]
    lines = [
        "| " + " | ".join(map(str, headers)) + " |",
        "| " + " | ".join(rule) + " |",
    ]
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(
                f"Invalid row: {len(row)} cells for {len(headers)} columns"
            )
        cells = [str(c).replace("|", "\\|") for c in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_lr(lr: float | None) -> str:
    """``1e-3`` -> ``"1e-3"``, ``3.16e-4`` -> ``"3.2e-4"``, ``None`` -> ``"-"``."""
    if lr is None:
        return "-"
    exponent = math.floor(math.log10(lr))
    mantissa = lr / 10**exponent
    if abs(mantissa - round(mantissa)) < 0.05 and round(mantissa) == 1:
        return f"1e{exponent}"
    if round(mantissa, 1) >= 10:
        return f"1e{exponent + 1}"
    return f"{mantissa:.2g}e{exponent}"


def format_number(value: float | None, digits: int = 3) -> str:
    """Significant-digit formatting; ``"n/a"`` for missing or non-finite values."""
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:.{digits}g}"


def format_mean_std(mean: float | None, std: float | None, digits: int = 3) -> str:
    """``"0.123 ± 0.004"`` (the spread is omitted when it is missing or zero)."""
    if mean is None or not math.isfinite(mean):
        return "n/a"
    if std is None or not math.isfinite(std) or std == 0:
        return format_number(mean, digits)
    return f"{format_number(mean, digits)} ± {format_number(std, 2)}"


def format_speedup(speedup: dict | None) -> str:
    """``"1.8x"``, or ``">=2.5x (never)"`` when the baseline never got there."""
    if speedup is None:
        return "n/a"
    text = f"{speedup['value']:.2f}x"
    return f">={text} (never)" if speedup["censored"] else text


def format_bytes(num: float | None) -> str:
    """Human-readable size in binary units (``"12.3 MiB"``)."""
    if num is None or not math.isfinite(num):
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(num) < 1024 or unit == "GiB":
            return f"{num:.0f} {unit}" if unit == "B" else f"{num:.1f} {unit}"
        num /= 1024
    raise AssertionError("unreachable")


def cache_directory(directory: str | os.PathLike) -> Path:
    """``directory`` for a cache of result files, created when missing.

    Raises:
        ValueError: it exists and is not a directory.
    """
    path = Path(directory)
    if path.exists() and not path.is_dir():
        raise ValueError(f"Invalid cache directory (not a directory): {directory}")
    path.mkdir(parents=True, exist_ok=True)
    return path
