"""Fine-tuning a pretrained ResNet to new classes from a few images: the
regime where small steps are needed and a rule that pushes hard forgets what
pretraining learned and overfits.

Sizes: full ResNet-14 (16-32-64, 175k parameters), batch 25, 500 steps,
pretrained for 500 AdamW steps; quick ResNet-8 (8-16-32, 20k), 60 steps,
pretrained for 150.

Pretraining (once, then cached): the ResNet of :mod:`.resnet` (smaller) is
trained on digits 0-4 of the training split with a fixed AdamW recipe. Its
state is stored as a safetensors file (never pickle) named by a hash of the
pretraining config, under ``runs/workload_cache/`` or the directory in the
environment variable ``LOPT_WORKLOAD_CACHE``, written atomically (temp file
then ``os.replace``), and loaded by every job; a missing, unreadable or
mismatched file is rebuilt.

Fine-tuning: digits 5-9 relabelled 0-4, from a fixed 20 training images per
class (augmented as in :mod:`.resnet`), judged on the held-out split's 5-9
(about 180 images). Every weight is trained; the head is new (5 outputs),
initialised from the seed, which otherwise only sets the batch order.
Weight decay 1e-2 on conv and linear weights (none on biases and BN
parameters), no clip. Muon gets no matrices (the head is the only 2-D
weight).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from benchmarks.optim.workloads.images import (
    SPLIT_SEED,
    BatchStream,
    classifier_job,
    cross_entropy,
    digits,
    seeded_init,
    subset,
)
from benchmarks.optim.workloads.resnet import AUGMENTATION, ResNet
from benchmarks.optim.workloads.spec import Job, hidden_matrices, split_decay, workload

__all__ = [
    "WORKLOAD",
    "CACHE_ENV",
    "Pretraining",
    "FULL",
    "QUICK",
    "cache_dir",
    "cache_path",
    "pretrained_state",
]

#: Environment variable naming the directory of the pretrained weights.
CACHE_ENV = "LOPT_WORKLOAD_CACHE"
#: Bumped when pretraining changes in a way its config does not record.
PRETRAIN_VERSION = 1
SOURCE_CLASSES = (0, 1, 2, 3, 4)
TARGET_CLASSES = (5, 6, 7, 8, 9)
#: Fine-tuning images per target class (fixed subset of the training split).
PER_CLASS = 20
FINETUNE_BATCH = 25


@dataclass(frozen=True)
class Pretraining:
    """The pretraining recipe and the network it shapes (hashed into the
    cache file's name, so a change retrains)."""

    image: int
    widths: tuple[int, ...]
    blocks: int
    steps: int
    batch: int = 64
    lr: float = 2e-3
    weight_decay: float = 5e-4
    seed: int = 0

    def key(self) -> dict:
        """Everything the pretrained weights depend on."""
        return {
            "version": PRETRAIN_VERSION,
            "classes": list(SOURCE_CLASSES),
            "split_seed": SPLIT_SEED,
            "augmentation": AUGMENTATION,
            **dataclasses.asdict(self),
        }

    def digest(self) -> str:
        text = json.dumps(self.key(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


FULL = Pretraining(image=16, widths=(16, 32, 64), blocks=2, steps=500)
QUICK = Pretraining(image=16, widths=(8, 16, 32), blocks=1, steps=150)


def cache_dir() -> Path:
    """``$LOPT_WORKLOAD_CACHE`` when set, else ``<repo>/runs/workload_cache``
    (independent of the working directory)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3] / "runs" / "workload_cache"


def cache_path(config: Pretraining, directory: str | os.PathLike | None = None):
    """The safetensors file of ``config``'s pretrained weights."""
    directory = Path(directory) if directory is not None else cache_dir()
    return directory / f"finetune-pretrained-{config.digest()}.safetensors"


def _pretrain(config: Pretraining) -> dict[str, torch.Tensor]:
    """Train the network on the source classes (deterministic: fixed seed,
    fixed batches) and return its state."""
    data = digits(config.image)
    x, y = subset(data.x_train, data.y_train, SOURCE_CLASSES)
    with seeded_init(config.seed):
        model = ResNet(config.widths, config.blocks, classes=len(SOURCE_CLASSES))
    stream = BatchStream(data, x, y, config.batch, config.seed, AUGMENTATION)
    decay, no_decay = split_decay(model)
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": config.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=config.lr,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: 0.5 * (1 + math.cos(math.pi * t / config.steps))
    )
    model.train()
    for _ in range(config.steps):
        opt.zero_grad(set_to_none=True)
        cross_entropy(model, stream()).backward()
        opt.step()
        sched.step()
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def _load(path: Path, config: Pretraining) -> dict[str, torch.Tensor] | None:
    """The cached state, or ``None`` when missing, unreadable or made by
    another config."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    if not path.is_file():
        return None
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("config") != json.dumps(config.key(), sort_keys=True):
            return None
        return load_file(path)
    except (SafetensorError, OSError, ValueError):
        return None


def pretrained_state(
    config: Pretraining, directory: str | os.PathLike | None = None
) -> dict[str, torch.Tensor]:
    """The pretrained weights of ``config``: from the cache, or pretrained
    now (minutes at most) and cached.

    Args:
        config: the pretraining recipe.
        directory: the cache directory (default: :func:`cache_dir`).
    """
    from safetensors.torch import save_file

    path = cache_path(config, directory)
    state = _load(path, config)
    if state is not None:
        return state
    start = time.perf_counter()
    state = _pretrain(config)
    seconds = time.perf_counter() - start
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "config": json.dumps(config.key(), sort_keys=True),
        "seconds": f"{seconds:.1f}",
        "threads": str(torch.get_num_threads()),
    }
    # Temp file in the same directory, then an atomic rename: a concurrent
    # reader sees either no file or a whole one.
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        save_file(state, tmp, metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return state


def _make(seed: int, quick: bool) -> Job:
    config = QUICK if quick else FULL
    data = digits(config.image)
    state = pretrained_state(config)
    # The body's own initialisation is overwritten by the pretrained state;
    # only the new head's survives from the seed.
    with seeded_init(seed):
        model = ResNet(config.widths, config.blocks, classes=len(SOURCE_CLASSES))
        model.load_state_dict(state)
        model.head = nn.Linear(model.head.in_features, len(TARGET_CLASSES))
    x, y = subset(data.x_train, data.y_train, TARGET_CLASSES, PER_CLASS)
    x_val, y_val = subset(data.x_val, data.y_val, TARGET_CLASSES)
    stream = BatchStream(data, x, y, FINETUNE_BATCH, seed, AUGMENTATION)
    matrices = hidden_matrices(model, exclude=[model.head])
    return classifier_job(model, stream, x_val, y_val, split_decay(model), matrices)


WORKLOAD = workload(
    "finetune",
    "ResNet-14 pretrained on digits 0-4, fine-tuned to 5-9 (20/class)",
    _make,
)
