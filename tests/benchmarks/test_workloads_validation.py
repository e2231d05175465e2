"""The validation jobs NG's settings are chosen on
(benchmarks.optim.workloads.validation) and the text they read."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest
import torch

from benchmarks.optim.workloads import WORKLOAD_NAMES
from benchmarks.optim.workloads import validation as V
from benchmarks.optim.workloads.text import VAL_FRACTION, _stdlib_text, corpus


def test_stdlib_corpus_holds_out_the_tail_of_every_module():
    text = _stdlib_text()
    data = corpus("stdlib")
    assert abs(len(data.val) / (len(data.train) + len(data.val)) - VAL_FRACTION) < 1e-3
    assert text.isascii() and len(data.vocab) > 60
    held_out = text[len(data.train) :]
    # Every module's tail is held out, not one module of its own: the first
    # modules' last lines are all in the held-out split.
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.glob("[a-z]*.py"))[:5]:
        module = path.read_text(errors="replace").encode("ascii", "ignore").decode()
        tail = module[-min(60, len(module) // 20) :]  # within its held-out 10%
        assert tail in held_out
    with pytest.raises(ValueError, match="Invalid text source"):
        corpus("nope")


def test_validation_jobs_are_not_workloads_and_build():
    assert not set(V.JOBS) & set(WORKLOAD_NAMES)
    for name in (
        "val_mlp",
        "val_finetune",
    ):  # the text jobs are built in the runner tests
        job = V.JOBS[name].make(0, False)
        result = job.evaluate(job.model)
        assert set(result) == {"val_loss", "accuracy"}
        assert job.matrices and len(job.decay) + len(job.no_decay) == len(
            list(job.model.parameters())
        )


def test_variant_trainers_set_up_what_their_names_say():
    workload = V.JOBS["val_mlp"]
    job = workload.make(0, False)
    native = V._VariantTrainer(V.VARIANTS["ngopt_floor0"], job, workload, 50)
    opt = native.optimizers[0]
    assert opt.total_steps == 50 and opt.orthogonal
    assert opt.rule.step_size.log_min == 0.0 and not native.schedulers
    job = workload.make(0, False)
    wrapped = V._VariantTrainer(V.VARIANTS["ng_floor0_ortho_cool"], job, workload, 50)
    opt = wrapped.optimizers[0]
    assert opt.total_steps is None and not opt.orthogonal  # the wrappers instead
    assert len(wrapped.schedulers) == 1 and wrapped.matrices == job.matrices
    before = [p.detach().clone() for p in job.matrices]
    wrapped.zero_grad()
    job.loss(job.model, job.next_batch()).backward()
    wrapped.step()
    for p, old in zip(job.matrices, before):
        s = torch.linalg.svdvals(p.detach() - old)
        assert s[0] / s.median() < 1.7  # the step was orthogonalised
    adamw = V._VariantTrainer(
        V.VARIANTS["adamw@0.003"], workload.make(0, False), workload, 50
    )
    assert isinstance(adamw.optimizers[0], torch.optim.AdamW)
