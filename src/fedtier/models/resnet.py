"""CIFAR-style ResNet18 (He et al., 2016), one of the QAFed CIFAR-10 models.

Unlike the ImageNet ResNet, the stem is a single 3×3 conv (stride 1) with no max-pool; four
stages of two BasicBlocks (64, 128, 256, 512 channels, stride 2 from the second stage) end in
global average pooling, so any input size works (32×32, 28×28, 8×8...). 11,173,962 parameters
for CIFAR-10.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedtier.models.registry import Shape, register

_STAGES = ((64, 1), (128, 2), (256, 2), (512, 2))  # (channels, stride of the first block)
_BLOCKS_PER_STAGE = 2


class BasicBlock(nn.Module):
    """Two 3×3 conv–BN layers plus a shortcut (1×1 conv–BN when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """x [B, C, H, W] → logits [B, num_classes]."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        widths = [64] + [cout for cout, _ in _STAGES]
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            _stage(cin, cout, stride) for cin, (cout, stride) in zip(widths, _STAGES)
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(torch.flatten(self.pool(out), 1))


def _stage(cin: int, cout: int, stride: int) -> nn.Sequential:
    """One stage: a (possibly strided) block from ``cin`` to ``cout``, then same-shape blocks."""
    rest = (BasicBlock(cout, cout, 1) for _ in range(_BLOCKS_PER_STAGE - 1))
    return nn.Sequential(BasicBlock(cin, cout, stride), *rest)


@register("resnet18")
def resnet18(input_shape: Shape, num_classes: int) -> nn.Module:
    """CIFAR-style ResNet18 for inputs of any size with ``input_shape[0]`` channels."""
    return ResNet18(input_shape[0], num_classes)
