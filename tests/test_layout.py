"""The folder tree is the import graph, and the distribution matches it.

Every module's imports (top-level and lazy ones inside functions) are read
from its source: a folder may import only the folders below it in
:data:`LAYERS`, never one beside or above it, and no two modules import
each other, directly or through others.
"""

from __future__ import annotations

import ast
import configparser
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: Folder -> the folders its modules may import (besides their own).
#: Package ``__init__`` façades only re-export and are not checked.
LAYERS: dict[str, set[str]] = {
    # The fx walk both halves read a module's exact graph with.
    "lopt.tracing": set(),
    "lopt.graph": {"lopt.tracing"},
    "lopt.nn": {"lopt.graph"},
    "lopt.optim": {"lopt.graph", "lopt.nn"},
    "lopt.integrations": {"lopt.graph", "lopt.nn", "lopt.optim"},
    "lopt.tasks": {"lopt.graph", "lopt.nn", "lopt.optim"},
    # The weight-space half needs the shared core only; inside it, graphs
    # come first, models and splits read them, baselines and training use
    # all three; the zoos are built and stored on their own.
    "lopt.weightspace.graph": {"lopt.graph", "lopt.nn", "lopt.tracing"},
    "lopt.weightspace.models": {"lopt.graph", "lopt.nn", "lopt.weightspace.graph"},
    "lopt.weightspace.splits": {"lopt.weightspace.graph"},
    "lopt.weightspace.baselines": {
        "lopt.graph",
        "lopt.nn",
        "lopt.weightspace.graph",
        "lopt.weightspace.models",
        "lopt.weightspace.splits",
    },
    "lopt.weightspace.training": {
        "lopt.graph",
        "lopt.nn",
        "lopt.weightspace.graph",
        "lopt.weightspace.models",
        "lopt.weightspace.splits",
    },
    # Saving rebuilds any predictor; presets build models and trainers.
    "lopt.weightspace.saving": {
        "lopt.weightspace.baselines",
        "lopt.weightspace.models",
        "lopt.weightspace.training",
    },
    "lopt.weightspace.presets": {
        "lopt.weightspace.models",
        "lopt.weightspace.splits",
        "lopt.weightspace.training",
    },
    # Zoos are built on their own, and screened for non-finite weights by
    # the same check as every other way networks enter.
    "lopt.weightspace.zoos": {"lopt.weightspace.graph"},
    "meta_train": {"lopt"},
    "benchmarks.common": {"lopt"},
    "benchmarks.optim": {"lopt", "benchmarks.common"},
    "benchmarks.weightspace": {"lopt", "benchmarks.common"},
}


def _modules() -> dict[str, Path]:
    found = {}
    for top in ("lopt", "meta_train", "benchmarks"):
        for path in (ROOT / top).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports(path: Path) -> set[str]:
    """Project modules ``path`` imports (``from P import m`` names module
    ``P.m`` when that is a module)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                names.add(sub if sub in MODULES else node.module)
    return {n for n in names if n.split(".")[0] in ("lopt", "meta_train", "benchmarks")}


def _folder(module: str) -> str | None:
    matches = [f for f in LAYERS if module == f or module.startswith(f + ".")]
    return max(matches, key=len) if matches else None


def _within(module: str, folders: set[str]) -> bool:
    return any(module == f or module.startswith(f + ".") for f in folders)


def _is_facade(module: str) -> bool:
    return MODULES[module].name == "__init__.py"


def test_every_module_has_a_layer():
    # Outside the layers: façades, and the old command names at the top of
    # benchmarks/ (benchmarks.compare, ...) that only run their new command.
    unplaced = [
        m
        for m in MODULES
        if _folder(m) is None and not _is_facade(m) and not _is_moved_command(m)
    ]
    assert not unplaced


def _is_moved_command(module: str) -> bool:
    return module.count(".") == 1 and module.startswith("benchmarks.")


@pytest.mark.parametrize("module", sorted(m for m in MODULES if not _is_facade(m)))
def test_imports_run_only_downward(module):
    if _is_moved_command(module):
        assert _imports(MODULES[module]) <= {"benchmarks.common.cli"}
        return
    folder = _folder(module)
    allowed = LAYERS[folder] | {folder}
    upward = sorted(
        name for name in _imports(MODULES[module]) if not _within(name, allowed)
    )
    assert not upward, f"{module} ({folder}) imports {upward}"


def test_no_import_cycles():
    graph = {
        m: {n for n in _imports(p) if n in MODULES and not _is_facade(n)}
        for m, p in MODULES.items()
        if not _is_facade(m)
    }
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        if node in path:
            raise AssertionError(" -> ".join(path[path.index(node) :] + [node]))
        if node in done:
            return
        for nxt in sorted(graph.get(node, ())):
            visit(nxt, path + [node])
        done.add(node)

    for module in sorted(graph):
        visit(module, [])


def test_import_lopt_loads_only_the_core():
    code = (
        "import sys, lopt; "
        "bad = [m for m in ('torch_geometric', 'higher', 'sklearn', 'lopt.tasks', "
        "'lopt.weightspace', 'lopt.integrations.higher') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_install_pulls_only_the_core_dependencies():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    requires = cfg["options"]["install_requires"].split()
    assert sorted(r.split(">")[0].split("=")[0] for r in requires) == [
        "safetensors",
        "torch",
    ]
    assert cfg["options.packages.find"]["include"].split() == ["lopt*"]
    extras = cfg["options.extras_require"]
    assert "higher" in extras["higher"].split()
    assert "torch-geometric>=2.4" in extras["weightspace"].split()
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
