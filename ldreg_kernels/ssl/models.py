"""A small ResNet encoder and the MLP heads SimCLR and BYOL put on top of it.

LDReg acts on the encoder output (the representation a linear probe reads), as in the
paper, not on the projector output.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn


class BasicBlock(nn.Module):
    """Two 3x3 convs with batch norm and an identity (or 1x1, strided) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = (
            nn.Identity()
            if stride == 1 and cin == cout
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        )

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNetEncoder(nn.Module):
    """A CIFAR-style ResNet (3x3 stem, no max-pool) sized for 8-32 px images.

    Args:
        in_channels: 1 (digits) or 3 (CIFAR-10).
        widths: channels per stage; every stage after the first halves the resolution.
        blocks: basic blocks per stage.
        mean, std: per-channel input standardisation, stored as buffers.

    Shape:
        (B, C, H, W) in [0, 1] -> (B, widths[-1]) after global average pooling.
    """

    def __init__(
        self,
        in_channels: int = 1,
        widths: Sequence[int] = (16, 32, 64, 128),
        blocks: Sequence[int] = (1, 1, 1, 1),
        mean: Sequence[float] = (0.5,),
        std: Sequence[float] = (0.5,),
    ) -> None:
        super().__init__()
        if len(widths) != len(blocks):
            raise ValueError(f"widths and blocks must have one entry per stage, got {widths}, {blocks}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()
        )
        layers, cin = [], widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks)):
            for j in range(n):
                layers.append(BasicBlock(cin, w, 2 if (i > 0 and j == 0) else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.out_dim = cin

    def forward(self, x: Tensor) -> Tensor:
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        return self.layers(self.stem(x)).mean((2, 3))


def mlp(din: int, hidden: int, dout: int) -> nn.Sequential:
    """Linear-BN-ReLU-Linear: SimCLR's projector and BYOL's projector/predictor shape."""
    return nn.Sequential(nn.Linear(din, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, dout))
