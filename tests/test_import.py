"""What ``import lopt`` and using the optimizer cost a process: no heavy
imports nobody uses, and nothing written to disk but the fused kernel,
built once into its cache.

Each check runs in a fresh interpreter, since this test process has long
imported everything."""

from __future__ import annotations

import fnmatch
import json
import os
import subprocess
import sys
import textwrap

import lopt

#: Modules that ``import lopt`` must not load: torch_geometric (imported only
#: where it is used) and TorchDynamo (which ``import torch`` does not load
#: either; torch.optim loads it when the first optimizer of any kind is built).
HEAVY = ("torch_geometric", "torch._dynamo")

SCRIPT = textwrap.dedent(
    """
    import json, os, sys

    def listing():
        root = sys.argv[2]
        return sorted(
            os.path.relpath(os.path.join(d, name), root)
            for d, dirs, files in os.walk(root)
            for name in dirs + files
        )

    import torch
    import lopt
    from lopt import NGOptimizer

    at_import = sorted(m for m in sys.modules if m.startswith(HEAVY))

    torch.set_num_threads(1)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
        torch.nn.Linear(4 * 6 * 6, 3),
    )
    if sys.argv[1] == "adam":
        opt = torch.optim.Adam(model.parameters())
    else:
        opt = NGOptimizer(model.parameters())
    built = listing()
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(2, 1, 8, 8)).square().mean().backward()
        opt.step()
    in_use = sorted(m for m in sys.modules if m.startswith("torch_geometric"))
    from lopt.optim.fused import cpu_kernel

    print(json.dumps([at_import, in_use, built, listing(), cpu_kernel.available()]))
    """
).replace("HEAVY", repr(HEAVY))

#: Where the fused CPU kernel is cached by default, under ``$HOME``.
KERNEL_CACHE = os.path.join("home", ".cache", "lopt", "kernels")


def _package_files() -> set[str]:
    """Every path under the ``lopt`` package of this checkout but bytecode
    caches (this test process may write those)."""
    package = os.path.dirname(os.path.abspath(lopt.__file__))
    return {
        os.path.join(d, name)
        for d, dirs, files in os.walk(package)
        if "__pycache__" not in d.split(os.sep)
        for name in dirs + files
        if name != "__pycache__"
    }


def _run(tmp_path, optimizer):
    """Run SCRIPT with ``optimizer`` in fresh temp, working and home
    directories (so the kernel cache, ``~/.cache/lopt/kernels`` by default, is
    in there too); returns its output: the heavy modules loaded at import and
    by the steps, the paths left in those directories after building the
    optimizer and after two steps, and whether the kernel was available."""
    run = tmp_path / optimizer
    tmp, work, home = run / "tmp", run / "work", run / "home"
    for folder in (tmp, work, home):
        folder.mkdir(parents=True)
    env = {**os.environ, "TMPDIR": str(tmp), "TEMP": str(tmp), "TMP": str(tmp)}
    env["HOME"] = str(home)
    for name in ("XDG_CACHE_HOME", "LOPT_KERNEL_CACHE"):  # the default cache
        env.pop(name, None)
    # The project root, so that this checkout's lopt is imported.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, optimizer, str(run)],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_using_the_optimizer_imports_nothing_heavy_and_writes_nothing(tmp_path):
    """PyG's MessagePassing used to pull TorchDynamo into ``import lopt`` and
    write a generated ``*_propagate_*.py`` file into the temp directory of
    every process that built an optimizer. Building any torch optimizer
    creates an empty ``torchinductor_<user>`` directory there (torch.optim
    loads TorchDynamo), so the reference is the same script with Adam.

    ``import lopt`` and building an NGOptimizer write nothing, in the temp,
    working or home directory (where the kernel cache is) or in the
    checkout; its first step writes only the fused CPU kernel, built once
    into its cache (``~/.cache/lopt/kernels``), when a compiler is there."""
    package_before = _package_files()
    at_import, in_use, built, stepped, kernel = _run(tmp_path, "ng")
    assert at_import == [], f"import lopt loaded {len(at_import)}: {at_import[:3]}"
    assert in_use == [], f"the optimizer loaded {len(in_use)}: {in_use[:3]}"
    _, _, built_by_adam, stepped_by_adam, _ = _run(tmp_path, "adam")
    extra = sorted(set(built) - set(built_by_adam))
    assert extra == [], f"building it left behind beyond what Adam leaves: {extra}"
    extra = sorted(set(stepped) - set(stepped_by_adam))
    expected = []
    if kernel:  # the cache's folders and one library in it
        library = os.path.join(KERNEL_CACHE, "ng_dense-*.so")
        expected = [p for p in extra if fnmatch.fnmatch(p, library)][:1]
        assert expected, f"no kernel library in ~/.cache/lopt/kernels: {extra}"
        cache = os.path.dirname(os.path.dirname(KERNEL_CACHE))
        expected += [cache, os.path.dirname(KERNEL_CACHE), KERNEL_CACHE]
    assert extra == sorted(expected), f"its steps left behind: {extra}"
    new = sorted(_package_files() - package_before)
    assert new == [], f"written into the checkout: {new}"
