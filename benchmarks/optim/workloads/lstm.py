"""A character-level LSTM language model on Python's reference docs.

Data: :mod:`.text` (the ``pydoc_data`` topics text, last 10% held out).
Model: an embedding, a 2-layer ``nn.LSTM`` and an untied linear head, at
PyTorch's default initialisation, no dropout (the char-rnn recipe). Decay on
every 2-D weight (the embedding, the LSTM's ``weight_ih`` / ``weight_hh``,
the head), none on biases; weight decay 0.01, gradient clip 1.0.

Muon gets nothing here (``matrices`` is empty). Its update orthogonalises a
whole matrix, but an LSTM's ``weight_ih`` / ``weight_hh`` stack the four gate
matrices into one, so it would balance the gates' updates against each other
rather than treat each gate as the layer it is; and ``weight_hh`` is applied
at every time step, so the per-application bound on the output change that
motivates the spectral-norm step compounds over the sequence. Its authors
apply it to the hidden layers of feed-forward stacks; the embedding and the
head are left to AdamW as in every workload.

Sizes: full embedding 64, hidden 224, context 64, batch 16 (0.69M
parameters), 1500 steps, evaluated every 100 on 256 validation windows;
quick embedding 32, hidden 128, context 32, batch 32 (0.23M), 100 steps,
every 25.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from benchmarks.optim.workloads.spec import Job, workload
from benchmarks.optim.workloads.text import Windows, language_model_job

__all__ = ["WORKLOAD", "LSTMConfig", "CharLSTM"]


@dataclass(frozen=True)
class LSTMConfig(Windows):
    """Shape of the model (and, from :class:`Windows`, of its batches)."""

    embed: int
    hidden: int


#: Two stacked LSTM layers, full and quick.
LAYERS = 2
FULL = LSTMConfig(embed=64, hidden=224, context=64, batch=16, val_windows=256)
QUICK = LSTMConfig(embed=32, hidden=128, context=32, batch=32, val_windows=128)


class CharLSTM(nn.Module):
    """Embedding, stacked LSTM, linear head; ``forward`` returns logits."""

    def __init__(self, vocab_size: int, config: LSTMConfig):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, config.embed)
        self.lstm = nn.LSTM(
            config.embed, config.hidden, num_layers=LAYERS, batch_first=True
        )
        self.head = nn.Linear(config.hidden, vocab_size)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        # Every window starts from a zero state (no state carried across
        # batches), so windows are independent samples like the GPT's.
        out, _ = self.lstm(self.embedding(idx))
        return self.head(out)


def _make(seed: int, quick: bool) -> Job:
    config = QUICK if quick else FULL
    # No Muon share: see the module docstring.
    return language_model_job(lambda vocab: CharLSTM(vocab, config), config, seed)


WORKLOAD = workload(
    "lstm", "2-layer LSTM 224, char-level LM on Python's pydoc text", _make
)
