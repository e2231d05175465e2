"""Build and load the fused CPU kernel (``lopt/optim/fused/csrc/ng_dense.c``).

The kernel is plain C called through :mod:`ctypes`: no Python or torch
headers, so the system C compiler builds it in about a second, the first time
it is needed on a machine. The shared library is cached under
``$LOPT_KERNEL_CACHE`` (default ``~/.cache/lopt/kernels``), keyed by a hash of
the source, the compiler flags, the compiler's version and the CPU's feature
flags (it is built with ``-march=native``), written to a temporary name and
renamed, so concurrent processes never load a half-written file.

``import lopt`` neither builds nor loads the kernel (the first step does);
:func:`load` returns ``None`` when no compiler is available (or
``LOPT_DISABLE_KERNEL=1``), and the optimizer then takes the reference path.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from functools import lru_cache
from pathlib import Path

__all__ = ["load", "available", "check_weights", "SOURCE", "FLAGS"]

SOURCE = Path(__file__).with_name("csrc") / "ng_dense.c"
#: -fno-trapping-math lets the compiler turn the clamps of exp into vector
#: blends and -ffp-contract=fast fuses multiply-adds (twice as fast, measured);
#: unlike -ffast-math neither changes a floating-point mode of the process.
FLAGS = (
    "-O3",
    "-march=native",
    "-std=c11",
    "-fPIC",
    "-shared",
    "-fopenmp-simd",
    "-fno-math-errno",
    "-fno-trapping-math",
    "-ffp-contract=fast",
)

_P = ctypes.c_void_p
_I = ctypes.c_int64
_F = ctypes.c_float
_SIGNATURES = {
    "ng_weight_count": ((), ctypes.c_int),
    "ng_norms": ((_P, _I, _P, _P, _P), ctypes.c_int),
    "ng_trace": ((_P, _I, _P, _P, _P, _F, _P), None),
    "ng_moments": ((_P, _I, _I, _P, _P, _P, _P, _F, _P), None),
    "ng_messages": (
        (_P, _I, _I, _P, _P, _P, _P, _P, _P, _F, _P, _P, _P, _I, _P, _P, _I, _P, _P),
        None,
    ),
    "ng_update": (
        (_P, _I, _I, _P, _P, _P, _P, _P, _P, _F, _P, _P, _P, _I, _P, _P, _I, _P, _P)
        + (_F, _F, _F),
        None,
    ),
    "ng_lean_weight_count": ((), ctypes.c_int),
}


def _cache_dir() -> Path:
    root = os.environ.get("LOPT_KERNEL_CACHE")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(
        os.path.expanduser("~"), ".cache"
    )
    return Path(base, "lopt", "kernels")


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    import platform

    return platform.processor() + platform.machine()


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _build(compiler: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run(
            [compiler, *FLAGS, "-o", tmp, str(SOURCE)],
            check=True,
            capture_output=True,
            text=True,
        )
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@lru_cache(maxsize=1)
def load() -> ctypes.CDLL | None:
    """The kernel library, built on first use; ``None`` if it cannot be had
    (no C compiler, a failed build, or ``LOPT_DISABLE_KERNEL=1``), with a
    warning saying why, once."""
    if os.environ.get("LOPT_DISABLE_KERNEL", "") not in ("", "0"):
        return None
    compiler = _compiler()
    if compiler is None:
        warnings.warn(
            "lopt: no C compiler found (set CC): NGOptimizer takes its "
            "reference path, several times slower per step",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    try:
        version = subprocess.run(
            [compiler, "--version"], capture_output=True, text=True, check=True
        ).stdout
        key = hashlib.sha256(
            "\0".join(
                [SOURCE.read_text(), " ".join(FLAGS), version, _cpu_flags()]
            ).encode()
        ).hexdigest()[:20]
        target = _cache_dir() / f"ng_dense-{key}.so"
        if not target.exists():
            _build(compiler, target)
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", "") or str(error)
        warnings.warn(
            f"lopt: could not build the fused CPU kernel ({detail.strip()[:500]}): "
            "NGOptimizer takes its reference path, several times slower per step",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    for name, (args, result) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = list(args), result
    lib.ng_update_lean.argtypes = lib.ng_update.argtypes
    return lib


def available() -> bool:
    """Whether the fused CPU kernel can be used on this machine."""
    return load() is not None


def check_weights(lib: ctypes.CDLL, weights, lean: bool) -> None:
    """Raise :class:`ValueError` unless the packed rule weights ``weights``
    (a float32 tensor, see :func:`lopt.optim.fused.dense.pack_weights`) hold
    exactly as many values as the kernel reads: ``ng_lean_weight_count()``
    for the lean rule, else ``ng_weight_count()``. A packing that disagrees
    with ``ng_dense.c`` would otherwise be read out of bounds."""
    name = "ng_lean_weight_count" if lean else "ng_weight_count"
    expected = getattr(lib, name)()
    if weights.numel() != expected:
        raise ValueError(
            f"lopt: the packed rule weights hold {weights.numel()} values but the "
            f"fused kernel reads {expected} ({name}): lopt/optim/fused/dense.py "
            "packs them in an order ng_dense.c does not expect"
        )
