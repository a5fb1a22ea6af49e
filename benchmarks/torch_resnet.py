"""The same CIFAR ResNet as ``kd_jax.models`` in PyTorch, for the throughput comparison only.

A 3x3 stride-1 stem without max-pool, BasicBlocks with a 1x1 projection when the shape changes,
stages of width, 2, 4, 8 x width: with ``width=64`` it has the 11,173,962 parameters of
``kd_jax``'s ``resnet18``, so both frameworks do the same arithmetic.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

STAGES = {"resnet8": (1, 1, 1), "resnet10": (1, 1, 1, 1), "resnet18": (2, 2, 2, 2),
          "resnet34": (3, 4, 6, 3)}


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, stage_sizes: tuple[int, ...], width: int = 64, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU())
        blocks, cin = [], width
        for stage, n in enumerate(stage_sizes):
            for block in range(n):
                cout = width * 2**stage
                blocks.append(BasicBlock(cin, cout, 2 if stage > 0 and block == 0 else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def create(name: str, width: int, num_classes: int = 10) -> ResNet:
    if name not in STAGES:
        raise ValueError(f"no PyTorch twin for {name!r}; choose one of: {', '.join(STAGES)}")
    return ResNet(STAGES[name], width, num_classes)
