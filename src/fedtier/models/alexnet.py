"""CIFAR-sized AlexNet (Krizhevsky et al., 2012), one of the QAFed CIFAR-10 models.

Five 3×3 conv layers (64–192–384–256–256 channels, the first with stride 2) with ReLU and
2×2 max-pooling after conv 1, 2 and 5, then a 256·2·2 → hidden → hidden → K classifier.
Pools use ``ceil_mode`` and an adaptive average pool fixes the 2×2 map, so 32×32 (→ 2×2
natively), 28×28 and smaller inputs all work. Dropout before the first two Linear layers is
off by default so that training is deterministic.
"""

from __future__ import annotations

from torch import nn

from fedtier.models.options import positive_int, probability
from fedtier.models.registry import Shape, register

_CONVS = (
    (64, 2, True),
    (192, 1, True),
    (384, 1, False),
    (256, 1, False),
    (256, 1, True),
)  # (out, stride, pool)


@register("alexnet")
def alexnet(
    input_shape: Shape, num_classes: int, *, hidden: int = 4096, dropout: float = 0.0
) -> nn.Module:
    """AlexNet for small images: x [B, C, H, W] → logits [B, num_classes].

    ``hidden`` is the width of the two hidden Linear layers (4096 as in AlexNet, ≈23.3M
    parameters on CIFAR-10); ``dropout`` the rate before each of them.
    """
    hidden, dropout = positive_int("hidden", hidden), probability("dropout", dropout)
    return nn.Sequential(
        _features(input_shape[0]),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Dropout(dropout),
        nn.Linear(256 * 2 * 2, hidden),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


def _features(in_channels: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    cin = in_channels
    for cout, stride, pool in _CONVS:
        layers += [nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.ReLU()]
        if pool:
            layers.append(nn.MaxPool2d(2, ceil_mode=True))
        cin = cout
    return nn.Sequential(*layers)
