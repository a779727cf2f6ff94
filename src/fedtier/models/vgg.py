"""CIFAR-style VGG16 with BatchNorm (Simonyan & Zisserman, 2015), a QAFed CIFAR-10 model.

Thirteen 3×3 conv–BN–ReLU layers in five blocks separated by 2×2 max-pools, then a single
Linear(512 → K) as in the usual CIFAR variant. The pools use ``ceil_mode`` and a global
average pool precedes the classifier, so inputs smaller than 32×32 (28×28, 8×8) work; for
32×32 the network is the standard one (14,728,266 parameters on CIFAR-10).
"""

from __future__ import annotations

from torch import nn

from fedtier.models.registry import Shape, register

_POOL = "M"
_CONFIG: tuple[int | str, ...] = (
    64, 64, _POOL, 128, 128, _POOL, 256, 256, 256, _POOL, 512, 512, 512, _POOL, 512, 512, 512, _POOL,
)  # fmt: skip


@register("vgg16")
def vgg16(input_shape: Shape, num_classes: int) -> nn.Module:
    """VGG16-BN: x [B, C, H, W] → logits [B, num_classes]."""
    return nn.Sequential(
        _features(input_shape[0]),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(512, num_classes),
    )


def _features(in_channels: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    cin = in_channels
    for item in _CONFIG:
        if item == _POOL:
            layers.append(nn.MaxPool2d(2, ceil_mode=True))
        else:
            cout = int(item)
            layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]
            cin = cout
    return nn.Sequential(*layers)
