"""NGOptimizer trains real architectures, written the way users write them.

Each model below is a plain ``nn.Module`` (no torchvision): a ResNet with
BatchNorm and downsampling shortcuts, a MobileNet-style network with depthwise
and grouped convolutions, a ViT, a GPT-style decoder with tied embeddings and
causal attention, an LSTM language model and a ConvTranspose decoder. Each
trains a few full-batch steps on a fixed synthetic task it can fit (random
labels or next tokens of a small fixed batch, or a teacher's images), with
``NGOptimizer(model.parameters())`` and the shipped rule. For every model:

* the loss falls: the mean of the last three losses is below a fraction of
  the first loss (calibrated so that the same loop with the update's sign
  flipped fails it);
* every parameter that received a gradient has changed;
* every parameter, optimizer state value and loss stays finite, and no step
  is skipped.

The default versions are tiny (8x8 images, widths 8-32); bigger ones (32x32
images, deeper, wider, more steps) are marked ``slow``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lopt import NGOptimizer, default_rule_path, load_rule

RULE = load_rule(default_rule_path())


# ---------------------------------------------------------------------- ResNet
class BasicBlock(nn.Module):
    """The ResNet-18/34 block: two 3x3 convs with BatchNorm, and a 1x1 conv +
    BatchNorm shortcut when the block changes width or downsamples."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """Stem, then stages of basic blocks; each later stage doubles the width
    and halves the resolution (a downsampling shortcut)."""

    def __init__(self, width: int = 8, blocks: tuple[int, ...] = (1, 1), classes=10):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
        )
        stages, c_in = [], width
        for i, n in enumerate(blocks):
            c_out = width * 2**i
            for j in range(n):
                stride = 2 if i > 0 and j == 0 else 1
                stages.append(BasicBlock(c_in, c_out, stride))
                c_in = c_out
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(c_in, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


# ------------------------------------------------------------------- MobileNet
class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expansion, 3x3 depthwise (groups = channels),
    1x1 linear projection; residual when shapes allow."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand: int):
        super().__init__()
        hidden = c_in * expand
        self.block = nn.Sequential(
            nn.Conv2d(c_in, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, hidden, 3, stride, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
        )
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.residual else out


class MobileNet(nn.Module):
    """Stem, inverted residuals, then a grouped 3x3 conv (ResNeXt-style) and a
    classifier."""

    def __init__(self, width: int = 8, depth: int = 1, groups: int = 4, classes=10):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU6(),
        )
        blocks = [InvertedResidual(width, width, 1, expand=2) for _ in range(depth)]
        blocks.append(InvertedResidual(width, 2 * width, 2, expand=2))
        self.blocks = nn.Sequential(*blocks)
        self.grouped = nn.Sequential(
            nn.Conv2d(2 * width, 2 * width, 3, padding=1, groups=groups),
            nn.BatchNorm2d(2 * width),
            nn.ReLU6(),
        )
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.grouped(self.blocks(self.stem(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


# ------------------------------------------------------------------------- ViT
class ViT(nn.Module):
    """Vision transformer: conv patch embedding, cls token and learned
    positional embedding (``nn.Parameter``), pre-norm encoder layers,
    LayerNorm and a linear head on the cls token."""

    def __init__(
        self,
        image: int = 8,
        patch: int = 4,
        dim: int = 16,
        depth: int = 1,
        heads: int = 2,
        classes: int = 10,
    ):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch, stride=patch)
        tokens = (image // patch) ** 2 + 1
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            dim, heads, 2 * dim, dropout=0.0, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(len(x), -1, -1), x], dim=1) + self.pos
        return self.head(self.norm(self.encoder(x)[:, 0]))


# ------------------------------------------------------------------------- GPT
class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (
            part.view(b, t, self.heads, d // self.heads).transpose(1, 2)
            for part in self.qkv(x).split(d, dim=2)
        )
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class GPTBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Decoder-only transformer; the output projection is tied to the token
    embedding (``self.head.weight = self.embed.weight``)."""

    def __init__(
        self, vocab: int = 16, context: int = 8, dim: int = 16, depth=1, heads=2
    ):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(context, dim)
        self.blocks = nn.Sequential(*[GPTBlock(dim, heads) for _ in range(depth)])
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight
        # GPT-2's initialisation: small embeddings keep the tied logits small.
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.pos.weight, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.embed(tokens) + self.pos(positions)
        return self.head(self.ln_f(self.blocks(x)))


# ------------------------------------------------------------------------ LSTM
class LSTMLanguageModel(nn.Module):
    """Embedding -> 2-layer LSTM -> linear over the vocabulary."""

    def __init__(self, vocab: int = 16, dim: int = 16, hidden: int = 16, layers=2):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.lstm = nn.LSTM(dim, hidden, num_layers=layers, batch_first=True)
        self.out = nn.Linear(hidden, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.lstm(self.embed(tokens))
        return self.out(hidden)


# -------------------------------------------------------------- ConvTranspose
class Decoder(nn.Module):
    """Latent -> Linear -> a 2x2 map -> ConvTranspose2d stack (each doubles the
    resolution) -> a 3-channel image."""

    def __init__(self, latent: int = 8, width: int = 16, image: int = 8):
        super().__init__()
        self.width = width
        self.fc = nn.Linear(latent, width * 2 * 2)
        layers: list[nn.Module] = []
        size, c = 2, width
        while size < image:
            last = 2 * size == image
            c_out = 3 if last else max(c // 2, 4)
            layers.append(nn.ConvTranspose2d(c, c_out, 4, stride=2, padding=1))
            if not last:
                layers += [nn.BatchNorm2d(c_out), nn.ReLU()]
            size, c = 2 * size, c_out
        self.deconv = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.fc(z)).view(len(z), self.width, 2, 2)
        return torch.tanh(self.deconv(x))


# ----------------------------------------------------------------------- tasks
def images(n: int, size: int, classes: int = 10):
    """A fixed batch of random images with random labels (to memorise)."""
    gen = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, size, size, generator=gen), torch.randint(
        classes, (n,), generator=gen
    )


def sequences(n: int, length: int, vocab: int = 16):
    """A fixed batch of random token sequences; targets are the next tokens."""
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(vocab, (n, length + 1), generator=gen)
    return tokens[:, :-1], tokens[:, 1:]


def teacher_images(n: int, make: Callable[[], Decoder], latent: int):
    """Latents and the images a randomly initialised teacher decodes them to."""
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(n, latent, generator=gen)
    torch.manual_seed(123)
    teacher = make()
    with torch.no_grad():
        return z, teacher(z)


def token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


@dataclass(frozen=True)
class Task:
    """A model, its fixed data and loss, and how far the loss must fall."""

    name: str
    model: Callable[[], nn.Module]
    data: Callable[[], tuple[torch.Tensor, torch.Tensor]]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    steps: int
    #: The mean of the last three losses must be below ``max_ratio`` times the
    #: first loss.
    max_ratio: float
    lr: float = 1.0


def _decoder_task(name, steps, max_ratio, latent, width, image, n, **kw) -> Task:
    def make() -> Decoder:
        return Decoder(latent, width, image)

    return Task(
        name,
        make,
        lambda: teacher_images(n, make, latent),
        F.mse_loss,
        steps,
        max_ratio,
        **kw,
    )


# ``lr`` multiplies the rule's Adam-like base step of 1e-3: 1 (the default)
# where that fits the task in 30 steps, more where a small batch of random
# tokens is slow to memorise at 1e-3 (as one would tune Adam's).
TASKS = [
    Task("resnet", ResNet, lambda: images(16, 8), F.cross_entropy, 30, 0.75),
    Task("mobilenet", MobileNet, lambda: images(16, 8), F.cross_entropy, 30, 0.75, 3),
    Task("vit", ViT, lambda: images(16, 8), F.cross_entropy, 30, 0.6),
    Task("gpt", GPT, lambda: sequences(8, 8), token_loss, 30, 0.8, 3),
    Task("lstm", LSTMLanguageModel, lambda: sequences(8, 8), token_loss, 30, 0.8, 10),
    _decoder_task("decoder", 30, 0.6, latent=8, width=16, image=8, n=16),
]

SLOW_TASKS = [
    Task(
        "resnet-32px",
        lambda: ResNet(width=16, blocks=(2, 2, 2)),
        lambda: images(32, 32),
        F.cross_entropy,
        60,
        0.3,
    ),
    Task(
        "mobilenet-32px",
        lambda: MobileNet(width=16, depth=2, groups=2),
        lambda: images(32, 32),
        F.cross_entropy,
        60,
        0.3,
        3,
    ),
    Task(
        "vit-32px",
        lambda: ViT(image=32, patch=8, dim=32, depth=3, heads=4),
        lambda: images(32, 32),
        F.cross_entropy,
        60,
        0.3,
    ),
    Task(
        "gpt-deep",
        lambda: GPT(vocab=32, context=16, dim=32, depth=3, heads=4),
        lambda: sequences(16, 16, vocab=32),
        token_loss,
        60,
        0.4,
        3,
    ),
    Task(
        "lstm-wide",
        lambda: LSTMLanguageModel(vocab=32, dim=32, hidden=64, layers=2),
        lambda: sequences(16, 16, vocab=32),
        token_loss,
        60,
        0.3,
        10,
    ),
    _decoder_task("decoder-32px", 60, 0.5, latent=16, width=32, image=32, n=32),
]


# ----------------------------------------------------------------------- check
def train_and_check(task: Task) -> list[float]:
    """Train ``task`` and assert the contract of the module docstring; return
    the losses."""
    torch.manual_seed(0)
    model = task.model()
    x, y = task.data()
    opt = NGOptimizer(model.parameters(), lr=task.lr, rule=RULE)
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    got_grad: set[str] = set()
    losses = []
    for _ in range(task.steps):
        opt.zero_grad()
        loss = task.loss(model(x), y)
        loss.backward()
        got_grad |= {n for n, p in model.named_parameters() if p.grad is not None}
        opt.step()
        losses.append(loss.item())

    assert all(math.isfinite(v) for v in losses), losses
    assert opt.skipped_steps == 0
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), f"{name} is not finite"
    for p in model.parameters():
        for key, value in opt.state[p].items():
            assert torch.isfinite(value).all(), f"state {key} is not finite"
    params = dict(model.named_parameters())
    # Every parameter of these models is used: the check below covers them all.
    assert got_grad == set(params), f"no gradient: {set(params) - got_grad}"
    stuck = [n for n in sorted(got_grad) if torch.equal(params[n], initial[n])]
    assert not stuck, f"parameters with gradients that never changed: {stuck}"
    final = sum(losses[-3:]) / 3
    assert final < task.max_ratio * losses[0], (
        f"{task.name}: loss {losses[0]:.4f} -> {final:.4f} (mean of the last 3), "
        f"needs < {task.max_ratio} x; every 5th: {losses[::5]}"
    )
    return losses


@pytest.mark.parametrize("task", TASKS, ids=lambda t: t.name)
def test_real_model_trains(task: Task):
    """A tiny real architecture, trained with NGOptimizer(model.parameters()):
    the loss falls below a fraction of its start, every parameter with a
    gradient moves, and parameters, state and losses stay finite."""
    train_and_check(task)


@pytest.mark.slow
@pytest.mark.parametrize("task", SLOW_TASKS, ids=lambda t: t.name)
def test_bigger_real_model_trains(task: Task):
    """The same contract on bigger versions (32x32 images, deeper and wider
    networks, more steps, a stricter loss ratio)."""
    train_and_check(task)


def test_gpt_embedding_is_tied_and_seen_once():
    """The tied GPT weight is one parameter: the optimizer and its graph see
    it once, and training moves the embedding and the output projection
    together (they stay the same tensor)."""
    torch.manual_seed(0)
    model = GPT()
    assert model.head.weight is model.embed.weight
    params = list(model.parameters())
    assert sum(p is model.embed.weight for p in params) == 1
    opt = NGOptimizer(params, rule=RULE)
    assert opt.graph.num_scalars == sum(p.numel() for p in params)
    x, y = sequences(8, 8)
    before = model.embed.weight.detach().clone()
    for _ in range(2):
        opt.zero_grad()
        token_loss(model(x), y).backward()
        opt.step()
    assert model.head.weight is model.embed.weight
    assert not torch.equal(model.embed.weight, before)
