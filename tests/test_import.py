"""What ``import lopt`` and using the optimizer cost a process: no heavy
imports nobody uses, and nothing written to disk.

Each check runs in a fresh interpreter, since this test process has long
imported everything."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

#: Modules that ``import lopt`` must not load: torch_geometric (imported only
#: where it is used) and TorchDynamo (which ``import torch`` does not load
#: either; torch.optim loads it when the first optimizer of any kind is built).
HEAVY = ("torch_geometric", "torch._dynamo")

SCRIPT = textwrap.dedent(
    """
    import json, sys
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
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(2, 1, 8, 8)).square().mean().backward()
        opt.step()
    in_use = sorted(m for m in sys.modules if m.startswith("torch_geometric"))
    print(json.dumps([at_import, in_use]))
    """
).replace("HEAVY", repr(HEAVY))


def _run(tmp_path, optimizer):
    """Run SCRIPT with ``optimizer`` in fresh temp and working directories;
    returns its output and every path it left in them."""
    tmp, work = tmp_path / optimizer / "tmp", tmp_path / optimizer / "work"
    tmp.mkdir(parents=True)
    work.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp), "TEMP": str(tmp), "TMP": str(tmp)}
    # The project root, so that this checkout's lopt is imported.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, optimizer],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    left = sorted(
        os.path.relpath(os.path.join(d, name), tmp_path / optimizer)
        for d, dirs, files in os.walk(tmp_path / optimizer)
        for name in dirs + files
    )
    return json.loads(result.stdout.strip().splitlines()[-1]), left


def test_using_the_optimizer_imports_nothing_heavy_and_writes_nothing(tmp_path):
    """PyG's MessagePassing used to pull TorchDynamo into ``import lopt`` and
    write a generated ``*_propagate_*.py`` file into the temp directory of
    every process that built an optimizer. Building any torch optimizer
    creates an empty ``torchinductor_<user>`` directory there (torch.optim
    loads TorchDynamo), so the reference is the same script with Adam."""
    (at_import, in_use), left = _run(tmp_path, "ng")
    assert at_import == [], f"import lopt loaded {len(at_import)}: {at_import[:3]}"
    assert in_use == [], f"the optimizer loaded {len(in_use)}: {in_use[:3]}"
    _, left_by_adam = _run(tmp_path, "adam")
    extra = sorted(set(left) - set(left_by_adam))
    assert extra == [], f"left behind beyond what Adam leaves: {extra}"
