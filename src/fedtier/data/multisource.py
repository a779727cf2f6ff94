"""``multisource-mnist``: the same ten digit classes from three sources (seed 001's
label-related scenario: regions hold the same classes, each from its own source).

Sources (``ArrayDataset.source``), in this order:

0. ``mnist``: MNIST-5k as :func:`~fedtier.data.embedded.load_mnist5k` loads it (4,000 train /
   1,000 test);
1. ``digits``: scikit-learn's 8×8 digits (1,438 / 359, the ``digits`` split), each brought to
   28×28 by bilinear interpolation (``torch.nn.functional.interpolate``, ``align_corners=False``)
   of its [0, 1] pixels; the digit fills the whole frame, unlike MNIST's 20×20 box;
2. ``mnist-inverted``: the same MNIST-5k images with inverted pixels (1 − p): black digits on
   white. Inverted rather than rotated because inversion keeps each digit's shape and
   orientation, so one digit judge reads all three sources and a 6 never turns into a 9,
   while the style (background level) differs as much as possible, so a source judge tells the
   sources apart reliably and "share of samples per source" means something.

Every source is standardised with MNIST's mean/std (pixels p in [0, 1] → (p − 0.1307) /
0.3081), so all share MNIST's value range [−0.424, 2.821] (``fedtier.generative.to_pm1`` maps
it to [−1, 1]). The train and test splits are each source's own fixed split, concatenated.
"""

from __future__ import annotations

import torch

from fedtier.data.base import ArrayDataset
from fedtier.data.embedded import MNIST_MEAN, MNIST_STD, digits_pixels, load_mnist5k

SOURCES = ("mnist", "digits", "mnist-inverted")  # source id -> name
NAME = "multisource-mnist"


def load_multisource_mnist() -> tuple[ArrayDataset, ArrayDataset]:
    """``(train, test)`` of the three sources, concatenated in :data:`SOURCES` order, with
    digit labels ``y`` and the source id of each sample in ``source`` (``[N, 1, 28, 28]``)."""
    mnist_train, mnist_test = load_mnist5k()
    pixels, labels, train_idx, test_idx = digits_pixels()
    big = torch.nn.functional.interpolate(
        pixels, size=(28, 28), mode="bilinear", align_corners=False
    ).clamp_(0, 1)
    digits = (big - MNIST_MEAN) / MNIST_STD
    white = (1 - MNIST_MEAN) / MNIST_STD  # standardised value of pixel 1; 1 - p = white + black - x
    black = -MNIST_MEAN / MNIST_STD

    def joined(mnist: ArrayDataset, idx: torch.Tensor) -> ArrayDataset:
        parts = [
            (mnist.x, mnist.y),
            (digits[idx], labels[idx]),
            (white + black - mnist.x, mnist.y),
        ]
        source = torch.cat(
            [torch.full((len(y),), s, dtype=torch.long) for s, (_, y) in enumerate(parts)]
        )
        x = torch.cat([x for x, _ in parts]).contiguous()
        y = torch.cat([y for _, y in parts])
        return ArrayDataset(x, y, 10, NAME, source)

    return joined(mnist_train, train_idx), joined(mnist_test, test_idx)
