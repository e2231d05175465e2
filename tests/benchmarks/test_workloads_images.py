"""Tests of the image workloads (resnet, vit, finetune) and their shared data
module: the parameter groups, the seeded and augmented batch stream, the
held-out evaluation, that AdamW learns, and the fine-tuning cache."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from benchmarks.optim.workloads import finetune, images, resnet, vit
from benchmarks.optim.workloads.images import BatchStream, digits

torch.set_num_threads(1)

WORKLOADS = {"resnet": resnet, "vit": vit, "finetune": finetune}
#: A pretraining of a few steps on a tiny network: the tests check the
#: caching, not the pretrained quality.
TINY_PRETRAINING = finetune.Pretraining(
    image=16, widths=(4, 8, 8), blocks=1, steps=3, batch=16
)


@pytest.fixture(autouse=True)
def _tiny_finetune(tmp_path, monkeypatch):
    """Every test gets its own cache directory and the tiny pretraining."""
    monkeypatch.setenv(finetune.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(finetune, "QUICK", TINY_PRETRAINING)


def _make(name: str, seed: int = 0):
    return WORKLOADS[name].WORKLOAD.make(seed, True)


def test_split_is_stratified_and_fixed():
    data = digits(16)
    assert data.x_train.shape[1:] == data.x_val.shape[1:] == (1, 16, 16)
    assert len(data.x_train) + len(data.x_val) == 1797
    counts = torch.bincount(data.y_val, minlength=10)
    totals = counts + torch.bincount(data.y_train, minlength=10)
    for held, total in zip(counts.tolist(), totals.tolist()):
        assert held == round(images.HELD_OUT_FRACTION * total)
    assert 0.0 <= float(data.x_train.min()) and float(data.x_train.max()) <= 1.0
    digits.cache_clear()
    again = digits(16)
    assert torch.equal(again.x_val, data.x_val) and torch.equal(again.y_val, data.y_val)


@pytest.mark.parametrize("name", WORKLOADS)
def test_groups_partition_the_parameters(name):
    job = _make(name)
    trainable = {id(p) for p in job.model.parameters() if p.requires_grad}
    decay = [id(p) for p in job.decay]
    no_decay = [id(p) for p in job.no_decay]
    assert len(decay) + len(no_decay) == len(trainable)
    assert set(decay) | set(no_decay) == trainable
    assert not set(decay) & set(no_decay)
    assert {id(p) for p in job.matrices} <= set(decay)
    assert all(p.dim() == 2 for p in job.matrices)
    head = {id(p) for p in job.model.head.parameters()}
    assert not head & {id(p) for p in job.matrices}


def test_vit_groups_follow_vit_practice():
    job = _make("vit")
    model = job.model
    no_decay = {id(p) for p in job.no_decay}
    assert id(model.pos_embed) in no_decay and id(model.cls_token) in no_decay
    assert all(p.dim() >= 2 for p in job.decay)
    linears = [m for m in model.blocks.modules() if isinstance(m, torch.nn.Linear)]
    assert [id(m.weight) for m in linears] == [id(p) for p in job.matrices]
    assert linears


@pytest.mark.parametrize("name", WORKLOADS)
def test_batches_are_deterministic_in_the_seed(name):
    x0, y0 = _make(name, seed=0).next_batch()
    x0b, y0b = _make(name, seed=0).next_batch()
    x1, y1 = _make(name, seed=1).next_batch()
    assert torch.equal(x0, x0b) and torch.equal(y0, y0b)
    assert not torch.equal(x0, x1)


@pytest.mark.parametrize("name", WORKLOADS)
def test_augmentation_touches_training_batches_only(name):
    job = _make(name, seed=0)
    stream = job.next_batch
    assert isinstance(stream, BatchStream) and stream.augmentation
    # Same seed without augmentation: the same images, unaugmented.
    plain = BatchStream(stream.data, stream.x, stream.y, stream.batch_size, 0)
    before = job.evaluate(job.model)
    for _ in range(3):
        x, y = stream()
        x_plain, y_plain = plain()
        assert torch.equal(y, y_plain)
        assert x.shape == x_plain.shape
        assert not torch.allclose(x, x_plain)
    # Drawing batches leaves the held-out split (and its result) unchanged.
    assert job.evaluate(job.model) == before


@pytest.mark.parametrize("name", WORKLOADS)
def test_evaluate_is_finite_and_restores_the_mode(name):
    job = _make(name)
    job.model.train()
    result = job.evaluate(job.model)
    assert set(result) == {"val_loss", "accuracy"}
    assert all(math.isfinite(v) for v in result.values())
    assert 0.0 <= result["accuracy"] <= 1.0
    assert job.model.training
    workload = WORKLOADS[name].WORKLOAD
    assert workload.metric in result and workload.higher_is_better


@pytest.mark.parametrize("name", WORKLOADS)
def test_adamw_lowers_the_train_loss(name):
    job = _make(name)
    workload = WORKLOADS[name].WORKLOAD
    opt = torch.optim.AdamW(
        [
            {"params": job.decay, "weight_decay": workload.weight_decay},
            {"params": job.no_decay, "weight_decay": 0.0},
        ],
        lr=1e-3,
    )
    job.model.train()
    losses = []
    for _ in range(20):
        opt.zero_grad(set_to_none=True)
        loss = job.loss(job.model, job.next_batch())
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert sum(losses[-5:]) < sum(losses[:5])


def test_pretrained_weights_are_cached_and_loaded_identically(monkeypatch):
    path = finetune.cache_path(TINY_PRETRAINING)
    assert not path.exists()
    first = _make("finetune", seed=0)
    assert path.is_file()
    mtime = path.stat().st_mtime_ns

    def fail(config):
        raise AssertionError("pretrained again despite the cache")

    monkeypatch.setattr(finetune, "_pretrain", fail)
    second = _make("finetune", seed=0)
    other = _make("finetune", seed=1)
    assert path.stat().st_mtime_ns == mtime
    state = finetune.pretrained_state(TINY_PRETRAINING)
    for job in (first, second, other):
        for key, value in job.model.state_dict().items():
            if not key.startswith("head."):
                assert torch.equal(value, state[key]), key
    # The seed sets the new head (5 outputs) and nothing else.
    heads = [job.model.head for job in (first, second, other)]
    assert heads[0].out_features == len(finetune.TARGET_CLASSES)
    assert torch.equal(heads[0].weight, heads[1].weight)
    assert not torch.equal(heads[0].weight, heads[2].weight)


def test_pretraining_cache_is_keyed_and_rebuilt_when_unreadable(tmp_path):
    longer = dataclasses.replace(TINY_PRETRAINING, steps=4)
    assert finetune.cache_path(longer) != finetune.cache_path(TINY_PRETRAINING)
    assert finetune.cache_dir() == tmp_path / "cache"
    state = finetune.pretrained_state(TINY_PRETRAINING, tmp_path / "other")
    path = finetune.cache_path(TINY_PRETRAINING, tmp_path / "other")
    path.write_bytes(b"not a safetensors file")
    rebuilt = finetune.pretrained_state(TINY_PRETRAINING, tmp_path / "other")
    assert state.keys() == rebuilt.keys()
    assert all(torch.equal(state[k], rebuilt[k]) for k in state)
    assert not list(path.parent.glob("*.tmp"))
