"""Character-level language modelling on text shipped with Python.

The corpus is the English reference documentation in
``pydoc_data.topics.topics`` (about 465k characters; nothing downloaded),
its entries concatenated in sorted key order. The vocabulary is every
character of the whole text (as nanoGPT's ``shakespeare_char`` builds it), so
a validation character never falls outside it. The first 90% of the
characters train, the last 10% are held out.

The text is whatever the running Python ships, so its length, vocabulary and
losses differ slightly between Python versions; compare runs made with the
same one.

:func:`language_model_job` turns a model mapping ``(batch, context)`` token
ids to ``(batch, context, vocab)`` logits into a :class:`Job`: random train
windows from a generator seeded by the job seed, the next-character
cross-entropy as the loss, and its mean over a fixed set of validation
windows as ``val_loss``. The GPT and LSTM workloads share all of it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.optim.workloads.spec import Job, split_decay

__all__ = ["Corpus", "Windows", "corpus", "language_model_job", "VAL_FRACTION"]


@dataclass(frozen=True)
class Windows:
    """How a language model job cuts the text: ``context`` characters per
    window, ``batch`` windows per training batch, ``val_windows`` held-out
    windows per evaluation."""

    context: int
    batch: int
    val_windows: int


#: Share of the characters (the tail of the text) held out for validation.
VAL_FRACTION = 0.1
#: Validation windows evaluated per forward pass (bounds eval memory).
_EVAL_CHUNK = 64
#: Offsets the train generator's seed from the model's, so the two streams
#: are unrelated even though both derive from the job seed.
_DATA_SEED_OFFSET = 10_000


@dataclass(frozen=True)
class Corpus:
    """The tokenised text.

    Attributes:
        vocab: the distinct characters, sorted; a token is an index into it.
        train: token ids of the first ``1 - VAL_FRACTION`` of the text.
        val: token ids of the held-out tail.
    """

    vocab: str
    train: torch.Tensor
    val: torch.Tensor

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)


#: Characters of Python's own source taken for the ``"stdlib"`` corpus.
STDLIB_CHARS = 500_000


def _stdlib_text() -> str:
    """About :data:`STDLIB_CHARS` characters of the standard library's public
    top-level modules (sorted by name, ASCII only): text of another kind than
    the pydoc topics, for validation jobs outside the benchmark.

    Each module gives its first ``1 - VAL_FRACTION`` to the front of the text
    and its tail to the back, so the held-out split (the text's tail) samples
    every module instead of being one module of its own."""
    import sysconfig
    from pathlib import Path

    texts, size = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("[a-z]*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        texts.append(text.encode("ascii", "ignore").decode())
        size += len(texts[-1])
        if size >= STDLIB_CHARS:
            break
    cuts = [int(len(t) * (1.0 - VAL_FRACTION)) for t in texts]
    front = "".join(t[:c] for t, c in zip(texts, cuts))
    return front + "".join(t[c:] for t, c in zip(texts, cuts))


#: Texts :func:`corpus` can tokenise.
SOURCES = ("pydoc", "stdlib")


@functools.lru_cache(maxsize=2)
def corpus(source: str = "pydoc") -> Corpus:
    """A text shipped with Python, tokenised and split (cached: built once).

    ``"pydoc"``: the pydoc topics (the benchmark's); ``"stdlib"``: Python
    source of the standard library (validation jobs, see
    :mod:`benchmarks.optim.workloads.validation`)."""
    if source == "pydoc":
        from pydoc_data.topics import topics

        text = "".join(topics[key] for key in sorted(topics))
    elif source == "stdlib":
        text = _stdlib_text()
    else:
        raise ValueError(f"Invalid text source: {source!r} (known: {SOURCES})")
    vocab = "".join(sorted(set(text)))
    index = {ch: i for i, ch in enumerate(vocab)}
    ids = torch.tensor([index[ch] for ch in text], dtype=torch.long)
    cut = int(len(ids) * (1.0 - VAL_FRACTION))
    return Corpus(vocab, ids[:cut], ids[cut:])


def _windows(data: torch.Tensor, starts: torch.Tensor, context: int):
    """Inputs ``data[s : s + context]`` and their next-character targets."""
    chunk = data[starts[:, None] + torch.arange(context + 1)]
    return chunk[:, :-1], chunk[:, 1:]


def _cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def language_model_job(
    build: Callable[[int], nn.Module],
    config: Windows,
    seed: int,
    matrices: Callable[[nn.Module], list[nn.Parameter]] = lambda model: [],
    source: str = "pydoc",
) -> Job:
    """A :class:`Job` training the model ``build(vocab_size)`` on the corpus.

    Args:
        build: makes the model, mapping ``(batch, context)`` token ids to
            ``(batch, context, vocab)`` logits; called inside a fork of the
            global generator seeded with ``seed``, so the init is a function
            of the seed alone and the caller's random state is untouched.
        config: has ``context`` (characters per window), ``batch`` (windows
            per training batch) and ``val_windows`` (how many validation
            windows ``evaluate`` averages over; their starts are evenly spaced
            over the held-out split, the same for every seed and optimizer,
            capped by the split's length).
        seed: the model's seed; the train-window generator's is offset from it.
        matrices: the job's Muon share, from the model (the caller decides what
            is hidden; none by default).
        source: the text (see :func:`corpus`).

    Returns:
        The job; decay / no-decay follow :func:`split_decay` (2-D weights,
        embeddings included, are decayed, as nanoGPT groups them).
    """
    data = corpus(source)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build(data.vocab_size)
    context, batch, val_windows = config.context, config.batch, config.val_windows
    train, val = data.train, data.val
    gen = torch.Generator().manual_seed(_DATA_SEED_OFFSET + seed)
    last_start = len(train) - context - 1

    def next_batch() -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(0, last_start + 1, (batch,), generator=gen)
        return _windows(train, starts, context)

    # Evenly spaced windows (overlapping only if more are asked for than the
    # split holds disjointly): every part of the held-out text counts, and the
    # estimate does not depend on a random draw.
    count = max(1, min(val_windows, len(val) - context))
    val_starts = torch.linspace(0, len(val) - context - 1, count).long()
    val_x, val_y = _windows(val, val_starts, context)

    def loss(m: nn.Module, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return _cross_entropy(m(b[0]), b[1])

    def evaluate(m: nn.Module) -> dict[str, float]:
        total = 0.0
        for i in range(0, count, _EVAL_CHUNK):
            x, y = val_x[i : i + _EVAL_CHUNK], val_y[i : i + _EVAL_CHUNK]
            # Sum per chunk so chunks of unequal size weigh by their tokens.
            total += float(_cross_entropy(m(x), y)) * y.numel()
        return {"val_loss": total / val_y.numel()}

    decay, no_decay = split_decay(model)
    return Job(model, next_batch, loss, evaluate, decay, no_decay, matrices(model))
