"""A small Vision Transformer on augmented digits: the ViT recipe people
train (pre-LN blocks, AdamW-style weight decay 0.05 with no decay on norms,
biases, position embeddings and the class token, gradient clip 1.0).

Sizes: full width 128, 4 blocks, 4 heads, MLP 256 (536k parameters), batch
128, 800 steps; quick width 64, 2 blocks (70k), batch 64, 100 steps, milder
augmentation.

Data: :mod:`.images` (scikit-learn digits upsampled to 16x16, 20% held
out). Model: 4x4 patches embedded by a strided conv, a class token and
learned position embeddings, pre-LN blocks of multi-head self-attention
(``F.scaled_dot_product_attention``) and a GELU MLP, a final LayerNorm and a
linear head on the class token. Muon's matrices are the blocks' linear
weights (attention and MLP).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.optim.workloads.images import (
    BatchStream,
    classifier_job,
    digits,
    seeded_init,
)
from benchmarks.optim.workloads.spec import Job, hidden_matrices, workload

__all__ = ["WORKLOAD", "ViT", "ViTSize", "FULL", "QUICK", "vit_param_groups"]


class Attention(nn.Module):
    """Multi-head self-attention with a fused QKV projection."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"Invalid heads: {heads} (must divide dim {dim})")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (b, heads, n, head_dim)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-LN transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Patch embedding, class token, learned positions, pre-LN blocks, final
    LayerNorm, linear head on the class token.

    Args:
        image: image side (a multiple of ``patch``).
        patch: patch side.
        dim: token width.
        depth: transformer blocks.
        heads: attention heads.
        mlp_ratio: MLP hidden width over ``dim``.
        classes: outputs of the head.
        in_channels: image channels.
        pool: what the head reads: ``"cls"`` the class token, ``"mean"`` the
            mean of the patch tokens.
    """

    #: Parameters ViT training scripts exempt from weight decay even though
    #: they are not 1-D (decaying them pulls the positions towards zero).
    no_weight_decay = ("pos_embed", "cls_token")

    def __init__(
        self,
        image: int = 16,
        patch: int = 4,
        dim: int = 128,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: int = 2,
        classes: int = 10,
        in_channels: int = 1,
        pool: str = "cls",
    ):
        super().__init__()
        if image % patch:
            raise ValueError(f"Invalid patch: {patch} (must divide image {image})")
        if pool not in ("cls", "mean"):
            raise ValueError(f"Invalid pool: {pool!r} (known: cls, mean)")
        self.pool = pool
        tokens = (image // patch) ** 2
        self.patch_embed = nn.Conv2d(in_channels, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens + 1, dim))
        self.blocks = nn.Sequential(
            *(Block(dim, heads, mlp_ratio) for _ in range(depth))
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)
        # The initialisation of the ViT papers: small truncated normals for
        # the tokens and linear weights, zero biases.
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (b, tokens, dim)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0] if self.pool == "cls" else x[:, 1:].mean(1))


def vit_param_groups(model: ViT) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``(decay, no_decay)`` as ViT training scripts group them: no decay for
    1-D parameters (biases, norm gains) and for the names in
    ``model.no_weight_decay``; decay for the rest (linear and conv weights)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.dim() <= 1 or name in model.no_weight_decay:
            no_decay.append(p)
        else:
            decay.append(p)
    return decay, no_decay


@dataclass(frozen=True)
class ViTSize:
    """The sizes of one variant (full or quick)."""

    image: int
    patch: int
    dim: int
    depth: int
    heads: int
    mlp_ratio: int
    batch: int
    augmentation: dict


# Milder augmentation in quick runs: a ViT (no translation equivariance)
# learns through the full one too slowly for 100 steps to say anything.
FULL_AUGMENTATION = {"shift": 2, "degrees": 10.0, "scale": 0.1, "noise": 0.03}
QUICK_AUGMENTATION = {"shift": 1, "degrees": 5.0, "scale": 0.05, "noise": 0.03}
# image, patch, dim, depth, heads, mlp_ratio, batch, augmentation
FULL = ViTSize(16, 4, 128, 4, 4, 2, 128, FULL_AUGMENTATION)
QUICK = ViTSize(16, 4, 64, 2, 4, 2, 64, QUICK_AUGMENTATION)


def _make(seed: int, quick: bool) -> Job:
    size = QUICK if quick else FULL
    data = digits(size.image)
    with seeded_init(seed):
        model = ViT(
            size.image, size.patch, size.dim, size.depth, size.heads, size.mlp_ratio
        )
    stream = BatchStream(
        data, data.x_train, data.y_train, size.batch, seed, size.augmentation
    )
    groups = vit_param_groups(model)
    matrices = hidden_matrices(model.blocks)
    return classifier_job(model, stream, data.x_val, data.y_val, groups, matrices)


WORKLOAD = workload(
    "vit", "ViT (4x4 patches, 4 pre-LN blocks, width 128) on augmented digits", _make
)
