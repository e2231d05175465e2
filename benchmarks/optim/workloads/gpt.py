"""A GPT-style character-level language model on Python's reference docs.

Data: :mod:`.text` (the ``pydoc_data`` topics text, last 10% held out).
Model: token + learned position embeddings, pre-LayerNorm blocks of causal
multi-head self-attention and a GELU MLP (4x wide), a final LayerNorm and an
output head tied to the token embedding; GPT-2's initialisation (normal, std
0.02; residual projections scaled by ``1/sqrt(2 * layers)``), no dropout.
Grouped as nanoGPT does: decay on every 2-D weight (the embeddings too), none
on biases and LayerNorm gains, weight decay 0.1, gradient clip 1.0. Muon
gets the blocks' Linear weights only.

Sizes: full 3 layers x width 128, 4 heads, context 64, batch 16 (0.62M
parameters), 1500 steps, evaluated every 100 on 256 validation windows;
quick 2 x 64, context 64, batch 16 (0.11M), 100 steps, every 25.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.optim.workloads.spec import Job, hidden_matrices, workload
from benchmarks.optim.workloads.text import Windows, language_model_job

__all__ = ["WORKLOAD", "GPTConfig", "GPT"]


@dataclass(frozen=True)
class GPTConfig(Windows):
    """Shape of the model (and, from :class:`Windows`, of its batches)."""

    layers: int
    width: int
    heads: int


FULL = GPTConfig(layers=3, width=128, heads=4, context=64, batch=16, val_windows=256)
QUICK = GPTConfig(layers=2, width=64, heads=4, context=64, batch=16, val_windows=128)


class _Block(nn.Module):
    """Pre-LayerNorm transformer block: ``x + attn(ln(x))``, ``x + mlp(ln(x))``."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln_attn = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.attn_out = nn.Linear(width, width)
        self.ln_mlp = nn.LayerNorm(width)
        self.mlp_in = nn.Linear(width, 4 * width)
        self.mlp_out = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln_attn(x)).split(c, dim=2)
        # (b, t, c) -> (b, heads, t, c / heads): attention runs per head.
        q, k, v = (
            z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v)
        )
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_out(y.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp_out(F.gelu(self.mlp_in(self.ln_mlp(x))))


class GPT(nn.Module):
    """Decoder-only transformer over characters; ``forward`` returns logits."""

    def __init__(self, vocab_size: int, config: GPTConfig):
        super().__init__()
        self.token = nn.Embedding(vocab_size, config.width)
        self.position = nn.Embedding(config.context, config.width)
        self.blocks = nn.ModuleList(
            _Block(config.width, config.heads) for _ in range(config.layers)
        )
        self.ln_final = nn.LayerNorm(config.width)
        self.head = nn.Linear(config.width, vocab_size, bias=False)
        # Tied: the head scores each character by its embedding, which halves
        # the vocabulary-sized parameters and is what GPT-2 and nanoGPT do.
        self.head.weight = self.token.weight
        self._init(config.layers)

    def _init(self, layers: int) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        # Each block adds two residual branches; shrinking their output
        # projections keeps the residual stream's variance from growing with
        # depth (GPT-2's scheme).
        for block in self.blocks:
            for proj in (block.attn_out, block.mlp_out):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * layers))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(idx.shape[1], device=idx.device)
        x = self.token(idx) + self.position(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_final(x))


def _make(seed: int, quick: bool) -> Job:
    config = QUICK if quick else FULL
    return language_model_job(
        lambda vocab: GPT(vocab, config),
        config,
        seed,
        # The blocks' Linear weights; the tied embedding/head stays with AdamW.
        lambda model: hidden_matrices(model, exclude=[model.token, model.head]),
    )


WORKLOAD = workload("gpt", "GPT 3x128, char-level LM on Python's pydoc text", _make)
