"""Without the fused CPU kernel (no C compiler, a compiler that fails, or
``LOPT_DISABLE_KERNEL=1``) NGOptimizer takes its reference path, with the
warning :func:`lopt.optim.fused.cpu_kernel.load` documents (once per process;
none when the kernel is disabled on purpose), and ``fused=True`` says why it
cannot apply.

The absence is simulated in a fresh interpreter (``load`` is cached per
process), so these tests run on every machine, with a compiler or without.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

SCRIPT = """
import json, warnings, torch
from torch import nn
from lopt import NGOptimizer

torch.manual_seed(0)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for _ in range(2):  # a second optimizer: the warning is not repeated
        m = nn.Linear(3, 2)
        before = m.weight.detach().clone()
        o = NGOptimizer(m.parameters())
        m(torch.randn(2, 3)).sum().backward()
        o.step()
        assert o._plan is None, "the fused path was taken"
        assert not torch.equal(m.weight, before), "the step did not update"
    try:
        NGOptimizer(m.parameters(), fused=True)
    except ValueError as error:
        assert "could not be built" in str(error), error
    else:
        raise AssertionError("fused=True did not raise")
print(json.dumps([str(w.message) for w in caught if "lopt" in str(w.message)]))
"""


def _run(tmp_path, **env) -> list[str]:
    """SCRIPT's lopt warnings, run with ``env`` over this process's
    environment (``None`` removes a variable), the kernel cache in
    ``tmp_path``, which must stay empty."""
    cache = tmp_path / "cache"
    full = {**os.environ, "LOPT_KERNEL_CACHE": str(cache)}
    for name, value in env.items():
        full.pop(name, None)
        if value is not None:
            full[name] = value
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        env=full,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert not cache.exists() or not any(cache.iterdir()), list(cache.iterdir())
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_without_a_compiler_the_reference_path_runs_with_a_warning(tmp_path):
    """No ``CC`` and no ``cc`` or ``gcc`` on ``PATH``."""
    empty = tmp_path / "bin"
    empty.mkdir()
    messages = _run(tmp_path, CC=None, PATH=str(empty), LOPT_DISABLE_KERNEL=None)
    assert len(messages) == 1, messages
    assert "no C compiler found (set CC)" in messages[0]
    assert "reference path" in messages[0]


def test_a_compiler_that_cannot_build_the_kernel_warns_why(tmp_path):
    """``CC`` names no program: the build fails, and the warning says so."""
    messages = _run(
        tmp_path, CC=str(tmp_path / "no-such-compiler"), LOPT_DISABLE_KERNEL=None
    )
    assert len(messages) == 1, messages
    assert "could not build the fused CPU kernel" in messages[0]
    assert "no-such-compiler" in messages[0]


def test_a_disabled_kernel_is_not_built_and_says_nothing(tmp_path):
    assert _run(tmp_path, LOPT_DISABLE_KERNEL="1") == []
