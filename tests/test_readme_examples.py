"""The documentation's code, run as written.

Every ``python`` block of README.md and of docs/*.md must follow a
``<!-- tested: NAME -->`` marker (NAME unique across all of them), and every
marked block is executed by a test: here (see ``RUNNERS``) or, for the names in
``RUN_ELSEWHERE``, by the test file named there. Blocks that use ``model``,
``loader``, ``loss_fn`` and ``steps`` without defining them get a tiny
regression problem in their namespace (``dataset`` for Hugging Face) and must
change the model's parameters and lower its loss on the whole data.
Lightning, transformers and higher come with the ``test`` extra; without them
their snippets are skipped.

Shell commands go stale differently: every ``python -m MODULE`` mentioned in
README.md, docs/*.md and benchmarks/*/README.md must name a module that exists.
"""

from __future__ import annotations

import importlib.util
import re
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
#: Files whose python blocks must be marked and run.
SNIPPET_FILES = (README, *sorted((ROOT / "docs").glob("*.md")))
#: Files whose ``python -m`` commands must name existing modules.
COMMAND_FILES = (*SNIPPET_FILES, *sorted((ROOT / "benchmarks").glob("*/README.md")))
#: Marked snippets executed by another test file, which must name the marker.
RUN_ELSEWHERE = {"weightspace_graph": "tests/weightspace/test_dataset.py"}

STEPS = 30
BATCH = 8
#: After STEPS steps the loss on the whole data must be below this fraction of
#: the initial one (measured: 0.70 with plain NGOptimizer steps, 0.82-0.83 with
#: the Lightning and Hugging Face snippets' decaying schedules).
MAX_LOSS_RATIO = 0.9

FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
MARKER = re.compile(r"<!-- tested: (\w+) -->")


def python_blocks(path: Path) -> list[tuple[str | None, int, str]]:
    """``(marker name or None, line, code)`` of every python block in ``path``;
    a block is marked when the line right above its fence is the marker."""
    text = path.read_text(encoding="utf-8")
    blocks = []
    for match in FENCE.finditer(text):
        above = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = MARKER.fullmatch(above.strip())
        line = text.count("\n", 0, match.start()) + 1
        blocks.append((marker.group(1) if marker else None, line, match.group(1)))
    return blocks


def snippets() -> dict[str, tuple[str, str]]:
    """``{name: (file, code)}`` of every marked python block."""
    found: dict[str, tuple[str, str]] = {}
    for path in SNIPPET_FILES:
        where = str(path.relative_to(ROOT))
        for name, line, code in python_blocks(path):
            assert name is not None, f"{where}:{line}: python block without a marker"
            assert name not in found, (
                f"{where}:{line}: {name!r} also in {found[name][0]}"
            )
            found[name] = (where, code)
    return found


def snippet(name: str) -> tuple[str, str]:
    """``(file:name, code)`` of one snippet, for ``compile``."""
    where, code = snippets()[name]
    return f"{where}:{name}", code


def test_every_python_block_is_marked_once():
    """Each python block has its own marker, and every marker marks a block."""
    names = snippets()  # asserts a marker on each block, each name once
    markers = [
        name
        for path in SNIPPET_FILES
        for name in MARKER.findall(path.read_text(encoding="utf-8"))
    ]
    assert sorted(markers) == sorted(names), "a marker not right above a python block"


def test_every_snippet_is_run():
    """The marked snippets are exactly those this file and RUN_ELSEWHERE run."""
    assert sorted(snippets()) == sorted([*RUNNERS, *RUN_ELSEWHERE])
    for name, test_file in RUN_ELSEWHERE.items():
        assert f"<!-- tested: {name} -->" in (ROOT / test_file).read_text(
            encoding="utf-8"
        )


def mentioned_modules() -> list[tuple[str, str]]:
    """``(file, module)`` for each ``python -m MODULE`` (or ``torchrun ... -m
    MODULE``) in the documentation, code blocks and prose alike."""
    command = re.compile(
        r"(?:\bpython3?|\btorchrun\b[^\n`]*?)\s+-m\s+([A-Za-z_][\w.]*)"
    )
    return sorted(
        {
            (str(path.relative_to(ROOT)), module)
            for path in COMMAND_FILES
            for module in command.findall(path.read_text(encoding="utf-8"))
        }
    )


def test_commands_are_found():
    """The scan sees the commands it is meant to check."""
    modules = {module for _, module in mentioned_modules()}
    assert {
        "benchmarks.optim.compare",
        "benchmarks.weightspace",
        "meta_train",
    } <= modules
    assert "pytest" in modules  # the README's test command


@pytest.mark.parametrize(("where", "module"), mentioned_modules())
def test_python_m_module_exists(where, module):
    """Moved or renamed commands cannot go stale in the docs."""
    assert importlib.util.find_spec(module) is not None, f"{where}: no module {module}"


# ----------------------------------------------------------------- the runs


class HFModel(nn.Module):
    """What ``transformers.Trainer`` expects: ``model(**batch)`` -> loss dict."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x, labels):
        return {"loss": nn.functional.mse_loss(self.net(x), labels)}


@pytest.fixture
def problem(tmp_path, monkeypatch):
    """A tiny MLP regression, run in ``tmp_path`` with RNG and threads restored."""
    monkeypatch.chdir(tmp_path)  # Lightning logs / HF output land here
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # Lightning would set threads
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    threads = torch.get_num_threads()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(STEPS * BATCH, 4, generator=gen)
        y = torch.sin(x @ torch.randn(4, 1, generator=gen))
        yield net, x, y
    torch.set_num_threads(threads)
    torch._dynamo.reset()


def run_snippet(name: str, net: nn.Module, x, y, **extra) -> dict:
    """Execute snippet ``name`` on the problem; check it trained ``net``."""
    where, code = snippet(name)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=BATCH
    )
    before = [p.detach().clone() for p in net.parameters()]
    with torch.no_grad():
        initial = nn.functional.mse_loss(net(x), y).item()
    namespace = {
        "model": net,
        "loader": loader,
        "loss_fn": nn.functional.mse_loss,
        "steps": STEPS,
        **extra,
    }
    exec(compile(code, where, "exec"), namespace)
    assert all(not torch.equal(p, q) for p, q in zip(net.parameters(), before))
    with torch.no_grad():
        final = nn.functional.mse_loss(net(x), y).item()
    assert final < MAX_LOSS_RATIO * initial, (initial, final)
    return namespace


def run_alone(name: str) -> dict:
    """Execute a self-contained snippet with the global RNG restored after."""
    where, code = snippet(name)
    namespace: dict = {}
    with torch.random.fork_rng():
        torch.manual_seed(0)
        exec(compile(code, where, "exec"), namespace)
    return namespace


def test_quickstart():
    """The README's optimizer quick start: short, self-contained, and it fits
    its regression (measured: final loss 0.036x the targets' variance)."""
    _, code = snippet("quickstart")
    assert len(code.strip().splitlines()) <= 16
    namespace = run_alone("quickstart")
    y = namespace["y"]
    assert namespace["loss"].item() < 0.1 * y.var().item()


def test_weightspace_example():
    """The weight-space example builds a dataset from its own networks,
    trains NG-GNN and predicts; its trainer must beat chance clearly."""
    _, code = snippet("weightspace")
    assert len(code.strip().splitlines()) <= 15
    namespace = run_alone("weightspace")
    assert namespace["trainer"].evaluate(namespace["test"])["accuracy"] >= 0.8


def test_weightspace_regression_example(tmp_path, monkeypatch):
    """The generalization-prediction example: the best preset ranks held-out
    losses from weights (measured: tau 0.60 on its 20 test networks, against
    0 for chance), and the saved predictor reloads with the same metrics."""
    from lopt.weightspace import load_predictor

    _, code = snippet("weightspace_regression")
    assert len(code.strip().splitlines()) <= 18
    monkeypatch.chdir(tmp_path)  # it writes loss_predictor.safetensors
    namespace = run_alone("weightspace_regression")
    metrics = namespace["trainer"].evaluate(namespace["test"])
    assert metrics["tau"] >= 0.4, metrics
    loaded = load_predictor(tmp_path / "loss_predictor.safetensors")
    assert loaded.evaluate(namespace["test"]) == metrics


def test_constructor(problem):
    """The constructor block, every argument spelled out, builds the default."""
    from lopt import NGOptimizer

    net, _, _ = problem
    where, code = snippet("constructor")
    namespace = {"model": net}
    exec(compile(code, where, "exec"), namespace)
    opt = namespace["opt"]
    assert isinstance(opt, NGOptimizer)
    assert opt.defaults["lr"] == 1.0 and opt.defaults["weight_decay"] == 0.0
    assert opt.nonfinite == "skip" and opt.fused is None
    assert opt.total_steps is None and opt.orthogonal is True
    default = NGOptimizer(net.parameters()).rule.state_dict()
    assert all(torch.equal(v, default[k]) for k, v in opt.rule.state_dict().items())


def test_orthogonal_groups():
    """The group key decides which matrices are orthogonalised; total_steps
    is kept; the step moves every parameter."""
    where, code = snippet("orthogonal_groups")
    namespace: dict = {}
    exec(compile(code, where, "exec"), namespace)
    opt, net = namespace["opt"], namespace["net"]
    assert opt.total_steps == 100
    # parameter order: net[2]'s weight and bias, then net[0]'s and net[4]'s
    assert opt._ortho.indices == (0,)
    assert float(opt.state[net[2].weight]["step"]) == 1


def test_model_groups():
    """Decay / no-decay groups with ``model=``: the graph of
    ``model.parameters()``, no warning, and the step moves every parameter."""
    from lopt import NGOptimizer

    where, code = snippet("model_groups")
    namespace: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.manual_seed(0)
        exec(compile(code, where, "exec"), namespace)
    opt, model = namespace["opt"], namespace["model"]
    plain = NGOptimizer(model.parameters()).graph
    params, order = opt._all_params(), opt.graph.tensor_order
    position = {id(p): i for i, p in enumerate(model.parameters())}
    assert [position[id(params[i])] for i in order] == list(plain.tensor_order)
    assert torch.equal(opt.graph.slot_node, plain.slot_node)
    assert all(opt.state[p]["step"] == 1 for p in model.parameters())


def test_scheduler(problem):
    """OneCycleLR with ``cycle_momentum=False``, stepped every batch."""
    run_snippet("scheduler", *problem)


def test_lightning(problem):
    """Lightning ``configure_optimizers`` returning NGOptimizer + a scheduler."""
    pytest.importorskip("lightning")
    run_snippet("lightning", *problem)


def test_transformers_trainer(problem):
    """``transformers.Trainer(optimizers=(NGOptimizer, scheduler))``, offline."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # Trainer needs it
    net, x, y = problem
    dataset = [{"x": x[i], "labels": y[i]} for i in range(len(x))]
    run_snippet("transformers", net, x, y, model=HFModel(net), dataset=dataset)


def test_torch_compile(problem):
    """A ``torch.compile`` d model trained with NGOptimizer."""
    run_snippet("compile", *problem)


def test_amp_autocast_and_grad_scaler(problem):
    """bf16 autocast with ``torch.amp.GradScaler`` and ``scaler.step(opt)``."""
    run_snippet("amp", *problem)


def test_higher():
    """Meta-gradients through learned steps reach the rule's weights."""
    pytest.importorskip("higher")
    namespace = run_alone("higher")
    rule = namespace["opt"].rule
    grads = [p.grad for p in rule.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    # The inner loop's steps lowered the loss the meta-gradient is taken of.
    model, x, y = namespace["model"], namespace["x"], namespace["y"]
    with torch.no_grad():
        initial = nn.functional.mse_loss(model(x), y).item()
    assert namespace["meta_loss"].item() < initial


def test_functional_step():
    """``ng_step`` on flat vectors trains the model's weights, out of place
    (measured: final loss 0.64-0.69x the initial one over torch seeds 0-4)."""
    namespace = run_alone("functional")
    model, x, y = namespace["model"], namespace["x"], namespace["y"]
    graph, names = namespace["graph"], namespace["names"]
    trained = dict(zip(names, graph.unflatten(namespace["flat"])))
    with torch.no_grad():
        initial = nn.functional.mse_loss(model(x), y).item()
        final = nn.functional.mse_loss(
            torch.func.functional_call(model, trained, x), y
        ).item()
    assert final < MAX_LOSS_RATIO * initial, (initial, final)


def test_rule_files(tmp_path, monkeypatch):
    """A saved rule is the two files, loads back identical and drives NGOptimizer."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # mkdtemp lands here
    namespace = run_alone("rule_files")
    path = Path(namespace["path"])
    assert path.parent.parent == tmp_path
    assert sorted(f.name for f in path.iterdir()) == [
        "config.json",
        "weights.safetensors",
    ]
    saved, loaded = namespace["rule"].state_dict(), namespace["opt"].rule.state_dict()
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    assert namespace["opt"].rule.config == namespace["rule"].config


#: Every snippet this file runs, by marker name.
RUNNERS = {
    "quickstart": test_quickstart,
    "weightspace": test_weightspace_example,
    "weightspace_regression": test_weightspace_regression_example,
    "constructor": test_constructor,
    "scheduler": test_scheduler,
    "orthogonal_groups": test_orthogonal_groups,
    "model_groups": test_model_groups,
    "lightning": test_lightning,
    "transformers": test_transformers_trainer,
    "compile": test_torch_compile,
    "amp": test_amp_autocast_and_grad_scaler,
    "higher": test_higher,
    "functional": test_functional_step,
    "rule_files": test_rule_files,
}
