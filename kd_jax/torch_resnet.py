"""The same CIFAR ResNet as ``kd_jax.core.models`` in PyTorch: the throughput benchmarks' and the
deployment report's PyTorch side.

A 3x3 stride-1 stem without max-pool, BasicBlocks with a 1x1 projection when the shape changes,
stages of width, 2, 4, 8 x width: with ``width=64`` it has the 11,173,962 parameters of
``kd_jax``'s ``resnet18``, so both frameworks do the same arithmetic. Convolutions pad as XLA's
``"SAME"`` does (at stride 2, nothing before and one row/column after), so :func:`from_flax`
gives a net that computes a kd-jax run's own logits.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

STAGES = {"resnet8": (1, 1, 1), "resnet10": (1, 1, 1, 1), "resnet18": (2, 2, 2, 2),
          "resnet34": (3, 4, 6, 3)}
# kd_jax's activations (flax.linen's functions) as PyTorch modules: flax's gelu is the tanh
# approximation.
ACTIVATIONS = {"relu": nn.ReLU, "silu": nn.SiLU, "gelu": lambda: nn.GELU(approximate="tanh")}


class SameConv2d(nn.Conv2d):
    """A bias-free convolution padded as XLA's ``"SAME"``: the padding a stride needs goes
    after the input rather than split evenly, where the two differ (stride 2, even size)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1):
        super().__init__(cin, cout, kernel, stride, 0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in zip(reversed(x.shape[2:]), reversed(self.kernel_size),
                              reversed(self.stride), strict=True):
            total = max((-(-size // s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return super().forward(F.pad(x, pads) if any(pads) else x)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, activation: str = "relu"):
        super().__init__()
        self.act = ACTIVATIONS[activation]()
        self.conv1 = SameConv2d(cin, cout, 3, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = SameConv2d(cout, cout, 3)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(SameConv2d(cin, cout, 1, stride),
                                          nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.act(y + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, stage_sizes: tuple[int, ...], width: int = 64, num_classes: int = 10,
                 activation: str = "relu"):
        super().__init__()
        self.stem = nn.Sequential(SameConv2d(3, width, 3), nn.BatchNorm2d(width),
                                  ACTIVATIONS[activation]())
        blocks, cin = [], width
        for stage, n in enumerate(stage_sizes):
            for block in range(n):
                cout = width * 2**stage
                blocks.append(BasicBlock(cin, cout, 2 if stage > 0 and block == 0 else 1,
                                         activation))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def create(name: str, width: int, num_classes: int = 10, activation: str = "relu") -> ResNet:
    if name not in STAGES:
        raise ValueError(f"no PyTorch twin for {name!r}; choose one of: {', '.join(STAGES)}")
    return ResNet(STAGES[name], width, num_classes, activation)


def from_flax(name: str, width: int, variables: Mapping[str, Any],
              bn_epsilon: float = 1e-5, activation: str = "relu") -> ResNet:
    """The twin in eval mode holding a kd-jax ResNet's trained ``variables`` (params and
    batch_stats), so it computes that run's logits: flax's HWIO kernels become PyTorch's OIHW,
    a BN without a scale (``bn_scale`` off) gets 1. Ghost BatchNorm needs nothing here: in
    inference it is plain BatchNorm."""
    params, stats = variables["params"], variables["batch_stats"]
    net = create(name, width, np.shape(params["Dense_0"]["bias"])[0], activation)
    with torch.no_grad():
        _load_conv_bn(net.stem[0], net.stem[1], params, stats, "0", bn_epsilon)
        for i, block in enumerate(net.blocks):
            p, s = params[f"BasicBlock_{i}"], stats[f"BasicBlock_{i}"]
            _load_conv_bn(block.conv1, block.bn1, p, s, "0", bn_epsilon)
            _load_conv_bn(block.conv2, block.bn2, p, s, "1", bn_epsilon)
            if len(block.shortcut):
                _load_conv_bn(*block.shortcut, p, s, "2", bn_epsilon)
        net.head.weight.copy_(_tensor(params["Dense_0"]["kernel"]).T)
        net.head.bias.copy_(_tensor(params["Dense_0"]["bias"]))
    return net.eval()


def _load_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d, params: Mapping[str, Any],
                  stats: Mapping[str, Any], index: str, epsilon: float) -> None:
    """Copy flax's ``Conv_<index>`` and ``BatchNorm_<index>`` into ``conv`` and ``bn``."""
    conv.weight.copy_(_tensor(params[f"Conv_{index}"]["kernel"]).permute(3, 2, 0, 1))
    norm = params[f"BatchNorm_{index}"]
    if "scale" in norm:
        bn.weight.copy_(_tensor(norm["scale"]))
    else:
        bn.weight.fill_(1.0)
    bn.bias.copy_(_tensor(norm["bias"]))
    bn.running_mean.copy_(_tensor(stats[f"BatchNorm_{index}"]["mean"]))
    bn.running_var.copy_(_tensor(stats[f"BatchNorm_{index}"]["var"]))
    bn.eps = epsilon


def _tensor(array: Any) -> torch.Tensor:
    """A float32 tensor owning a copy of a numpy or JAX array."""
    return torch.from_numpy(np.array(array, np.float32))
