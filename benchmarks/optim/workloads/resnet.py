"""A small ResNet with BatchNorm on augmented digits: the CNN recipe people
train (conv + BN + residual blocks, weight decay 5e-4, augmentation).

Sizes: full ResNet-20 (272k parameters), batch 128, 800 steps; quick
ResNet-8 (78k), batch 64, 80 steps.

Data: :mod:`.images` (scikit-learn digits upsampled to 16x16, 20% held
out). Model: a 3x3 stem, three stages of basic residual blocks (two 3x3
conv + BN, ReLU, 1x1 conv + BN shortcut where the shape changes), global
average pooling and a linear head. Weight decay on conv and linear weights,
none on biases and BN parameters. The only 2-D weight is the head, so Muon
gets no matrices here (conv kernels stay with AdamW).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from benchmarks.optim.workloads.images import (
    BatchStream,
    classifier_job,
    digits,
    seeded_init,
)
from benchmarks.optim.workloads.spec import Job, hidden_matrices, split_decay, workload

__all__ = ["WORKLOAD", "ResNet", "ResNetSize", "FULL", "QUICK"]


class BasicBlock(nn.Module):
    """Two 3x3 conv + BN with a shortcut (1x1 conv + BN when the shape
    changes), ReLU after the sum."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """Stem, stages of basic blocks (each after the first halves the
    resolution), global average pooling, linear head.

    Args:
        widths: channels of each stage.
        blocks: basic blocks per stage.
        classes: outputs of the head.
        in_channels: image channels.
    """

    def __init__(
        self,
        widths: Sequence[int] = (16, 32, 64),
        blocks: int = 2,
        classes: int = 10,
        in_channels: int = 1,
    ):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(),
        )
        layers, c_in = [], widths[0]
        for i, width in enumerate(widths):
            for j in range(blocks):
                stride = 2 if i > 0 and j == 0 else 1
                layers.append(BasicBlock(c_in, width, stride))
                c_in = width
        self.stages = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                # He initialisation for ReLU networks, as ResNet training
                # scripts use (torch's default is tuned for linear layers).
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.head(x.mean(dim=(2, 3)))


@dataclass(frozen=True)
class ResNetSize:
    """The sizes of one variant (full or quick)."""

    image: int
    widths: tuple[int, ...]
    blocks: int
    batch: int


FULL = ResNetSize(image=16, widths=(16, 32, 64), blocks=3, batch=128)
QUICK = ResNetSize(image=16, widths=(16, 32, 64), blocks=1, batch=64)
AUGMENTATION = {"shift": 2, "degrees": 10.0, "scale": 0.1, "noise": 0.03}


def _make(seed: int, quick: bool) -> Job:
    size = QUICK if quick else FULL
    data = digits(size.image)
    with seeded_init(seed):
        model = ResNet(size.widths, size.blocks)
    stream = BatchStream(
        data, data.x_train, data.y_train, size.batch, seed, AUGMENTATION
    )
    matrices = hidden_matrices(model, exclude=[model.head])
    return classifier_job(
        model, stream, data.x_val, data.y_val, split_decay(model), matrices
    )


WORKLOAD = workload(
    "resnet", "ResNet-20 (BN, 16-32-64) on augmented 16x16 digits", _make
)
