"""The README's "Using it in training code" snippets, run as written.

Every ``python`` block of that section must follow a ``<!-- tested: NAME -->``
marker; each is executed with a tiny regression problem in its namespace
(``model``, ``loader``, ``loss_fn``, ``steps``; ``dataset`` for Hugging Face)
and must change the model's parameters and lower its loss on the whole data.
Lightning and transformers come with the ``test`` extra; without them their
snippets are skipped.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## Using it in training code"
SNIPPETS = ("lightning", "transformers", "compile", "amp")
STEPS = 30
BATCH = 8
#: After STEPS steps the loss on the whole data must be below this fraction of
#: the initial one (measured: 0.70 with plain NGOptimizer steps, 0.82-0.83 with
#: the Lightning and Hugging Face snippets' decaying schedules).
MAX_LOSS_RATIO = 0.9


def readme_snippets() -> dict[str, str]:
    """``{name: code}`` of the marked python blocks in the README section."""
    text = README.read_text(encoding="utf-8")
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    section = text[start : end if end >= 0 else None]
    found = re.findall(r"<!-- tested: (\w+) -->\n```python\n(.*?)```", section, re.S)
    blocks = section.count("```python")
    assert len(found) == blocks, f"{blocks - len(found)} untested python block(s)"
    return dict(found)


#: Self-contained snippets of other sections, run as written.
OTHER_SNIPPETS = {"weightspace": "## Weight-space learning"}


def test_every_snippet_is_tested():
    """The section has exactly the snippets this file runs, each once."""
    text = README.read_text(encoding="utf-8")
    names = re.findall(r"<!-- tested: (\w+) -->", text)
    assert sorted(names) == sorted(SNIPPETS + tuple(OTHER_SNIPPETS))
    assert sorted(readme_snippets()) == sorted(SNIPPETS)


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


def run_snippet(name: str, net: nn.Module, x, y, **extra) -> None:
    """Execute snippet ``name``; check it trained ``net``."""
    code = readme_snippets()[name]
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
    exec(compile(code, f"README.md:{name}", "exec"), namespace)
    assert all(not torch.equal(p, q) for p, q in zip(net.parameters(), before))
    with torch.no_grad():
        final = nn.functional.mse_loss(net(x), y).item()
    assert final < MAX_LOSS_RATIO * initial, (initial, final)


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


def test_weightspace_example():
    """The weight-space example builds a dataset from its own networks,
    trains NG-GNN and predicts; its trainer must beat chance clearly."""
    text = README.read_text(encoding="utf-8")
    start = text.index(OTHER_SNIPPETS["weightspace"])
    code = re.search(
        r"<!-- tested: weightspace -->\n```python\n(.*?)```", text[start:], re.S
    ).group(1)
    assert len(code.strip().splitlines()) <= 15
    namespace: dict = {}
    with torch.random.fork_rng():
        exec(compile(code, "README.md:weightspace", "exec"), namespace)
    assert namespace["trainer"].evaluate(namespace["test"])["accuracy"] >= 0.8
