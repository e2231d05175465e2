"""Peak memory of CPU code, measured from the operating system in a fresh process.

``tracemalloc`` does not see PyTorch's allocations, and on CPU PyTorch keeps no
allocator statistics. What is measured instead is the resident set size
(RSS), which counts every byte the process really touched:

* a probe runs in its own interpreter (:func:`run_isolated`), so nothing from
  earlier measurements is resident;
* glibc's malloc is told to serve every allocation of 64 KiB or more with its
  own ``mmap`` (``MALLOC_MMAP_THRESHOLD_``) and to give freed memory straight
  back, so freed tensors leave the RSS and later ones cannot hide in memory
  that was freed before the measurement started;
* just before the code under test, the kernel's RSS high-water mark is reset
  (``/proc/self/clear_refs``, Linux >= 4.0) and the RSS read; after it, the
  high-water mark ``VmHWM`` is read. The difference is the peak memory the
  code added: persistent state plus transient buffers.

Where the high-water mark cannot be reset (not Linux), the probe falls back to
``getrusage`` maxima, which are an upper bound of the same quantity only if
setup used less memory than the code under test; the method used is reported.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from collections.abc import Iterable
from typing import Any

import torch

__all__ = [
    "PeakMemory",
    "current_rss",
    "tensor_bytes",
    "run_isolated",
]

_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"
#: Environment of isolated probes: large allocations mmapped, freed at once.
PROBE_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def _status_kib(field: str) -> int | None:
    try:
        with open(_STATUS, encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def current_rss() -> int | None:
    """Resident set size of this process in bytes (``None`` if unknown)."""
    kib = _status_kib("VmRSS")
    return None if kib is None else 1024 * kib


class PeakMemory:
    """Context manager: peak RSS added by the code in its block, in bytes.

    Example:
        >>> with PeakMemory() as peak:
        ...     opt.step()
        >>> peak.bytes  # high-water mark minus RSS at entry
    """

    def __init__(self):
        self.bytes: int | None = None
        self.method = "unknown"
        self._start = 0

    def __enter__(self) -> PeakMemory:
        try:
            with open(_CLEAR_REFS, "w", encoding="ascii") as f:
                f.write("5")  # "5": reset the peak RSS to the current RSS
            self.method = "VmHWM reset via /proc/self/clear_refs"
            self._start = current_rss() or 0
        except OSError:
            self.method = "getrusage ru_maxrss (not reset: upper bound)"
            self._start = current_rss() or 0
        return self

    def __exit__(self, *exc) -> None:
        if self.method.startswith("VmHWM"):
            peak = 1024 * (_status_kib("VmHWM") or 0)
        else:
            # ru_maxrss is KiB on Linux, bytes on macOS.
            scale = 1 if sys.platform == "darwin" else 1024
            peak = scale * resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.bytes = max(peak - self._start, 0)


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views counted once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def run_isolated(
    module: str, function: str, kwargs: dict[str, Any], timeout: float = 1800
) -> dict[str, Any]:
    """Call ``module.function(**kwargs)`` in a fresh interpreter; return its dict.

    The child runs with :data:`PROBE_ENV` and prints its JSON result on the
    last line of stdout.

    Raises:
        RuntimeError: the child failed; its stderr tail is in the message.
    """
    code = (
        "import json, sys, importlib\n"
        f"fn = getattr(importlib.import_module({module!r}), {function!r})\n"
        "print(json.dumps(fn(**json.loads(sys.argv[1]))))\n"
    )
    env = {**os.environ, **PROBE_ENV}
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps(kwargs)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    if proc.returncode != 0:
        tail = proc.stderr.strip()[-2000:]
        raise RuntimeError(f"{module}.{function}({kwargs}) failed:\n{tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
