"""Tests of the text workloads (GPT and LSTM character-level language models
on the pydoc text), at their quick sizes."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks.optim.workloads import gpt, lstm
from benchmarks.optim.workloads.spec import Job, Workload
from benchmarks.optim.workloads.text import VAL_FRACTION, corpus

torch.set_num_threads(1)

WORKLOADS = {"gpt": gpt.WORKLOAD, "lstm": lstm.WORKLOAD}


def _ids(params) -> list[int]:
    return [id(p) for p in params]


def _equal_batches(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def test_corpus_split_and_vocabulary():
    data = corpus()
    n = len(data.train) + len(data.val)
    assert len(data.val) == n - int(n * (1 - VAL_FRACTION))
    assert data.vocab == "".join(sorted(set(data.vocab)))
    for split in (data.train, data.val):
        assert 0 <= int(split.min()) and int(split.max()) < data.vocab_size


@pytest.mark.parametrize("name", WORKLOADS)
def test_groups_partition_the_trainable_parameters(name):
    job = WORKLOADS[name].make(0, True)
    trainable = _ids(p for p in job.model.parameters() if p.requires_grad)
    grouped = _ids(job.decay) + _ids(job.no_decay)
    assert len(grouped) == len(set(grouped))
    assert set(grouped) == set(trainable)
    assert all(p.dim() >= 2 for p in job.decay)
    assert all(p.dim() < 2 for p in job.no_decay)
    assert set(_ids(job.matrices)) <= set(_ids(job.decay))


def test_gpt_head_is_tied_and_muon_gets_the_blocks_linears():
    job = gpt.WORKLOAD.make(0, True)
    model = job.model
    assert model.head.weight is model.token.weight
    blocks = [
        m.weight for m in model.blocks.modules() if isinstance(m, torch.nn.Linear)
    ]
    assert _ids(job.matrices) == _ids(blocks)
    assert id(model.token.weight) in set(_ids(job.decay))


def test_lstm_gives_muon_nothing_and_decays_its_weight_matrices():
    job = lstm.WORKLOAD.make(0, True)
    assert job.matrices == []
    lstm_weights = [p for n, p in job.model.lstm.named_parameters() if "weight" in n]
    assert lstm_weights and set(_ids(lstm_weights)) <= set(_ids(job.decay))


@pytest.mark.parametrize("name", WORKLOADS)
def test_jobs_are_deterministic_in_the_seed(name):
    workload = WORKLOADS[name]
    state = torch.random.get_rng_state()
    a, b, c = (workload.make(seed, True) for seed in (0, 0, 1))
    # Building a job leaves the caller's generator where it was.
    assert torch.equal(state, torch.random.get_rng_state())
    first_a, first_b, first_c = a.next_batch(), b.next_batch(), c.next_batch()
    assert _equal_batches(first_a, first_b)
    assert not _equal_batches(first_a, first_c)
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(p, q)
    x, y = first_a
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the next characters


def _evaluate(job: Job) -> dict[str, float]:
    job.model.eval()
    with torch.no_grad():
        return job.evaluate(job.model)


@pytest.mark.parametrize("name", WORKLOADS)
def test_evaluate_is_finite_and_fixed(name):
    workload: Workload = WORKLOADS[name]
    job = workload.make(0, True)
    result = _evaluate(job)
    assert set(result) == {"val_loss", workload.metric}
    assert math.isfinite(result["val_loss"])
    # Near-uniform predictions at initialisation: about log(vocab).
    assert abs(result["val_loss"] - math.log(corpus().vocab_size)) < 0.5
    job.next_batch()  # the train stream does not move the validation windows
    assert _evaluate(job) == result


@pytest.mark.parametrize("name", WORKLOADS)
def test_twenty_adamw_steps_lower_the_train_loss(name):
    workload = WORKLOADS[name]
    job = workload.make(0, True)
    optimizer = torch.optim.AdamW(
        [
            {"params": job.decay, "weight_decay": workload.weight_decay},
            {"params": job.no_decay, "weight_decay": 0.0},
        ],
        lr=3e-3,
    )
    probe = job.next_batch()
    job.model.train()
    with torch.no_grad():
        before = float(job.loss(job.model, probe))
    for _ in range(20):
        optimizer.zero_grad(set_to_none=True)
        job.loss(job.model, job.next_batch()).backward()
        torch.nn.utils.clip_grad_norm_(job.model.parameters(), workload.clip)
        optimizer.step()
    with torch.no_grad():
        after = float(job.loss(job.model, probe))
    assert after < before - 0.5
