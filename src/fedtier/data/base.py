"""The in-memory data set every part of fedtier trains and evaluates on."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fedtier.errors import FedtierError


@dataclass(frozen=True, eq=False)
class ArrayDataset:
    """A labelled image data set held in memory.

    ``x`` is float32 ``[N, C, H, W]``, already normalised; ``y`` is int64 ``[N]`` with values in
    ``0 .. num_classes - 1``; ``name`` is the registry name it was loaded under. ``source``
    (int64 ``[N]`` or None) says which source each sample comes from in a multi-source data
    set (``multisource-mnist``: 0 MNIST, 1 sklearn digits, 2 inverted MNIST); partitions
    (``data.partition: source``) and the source judge read it.
    """

    x: torch.Tensor
    y: torch.Tensor
    num_classes: int
    name: str
    source: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.x.dtype != torch.float32 or self.x.dim() != 4:
            raise ValueError(
                f"x must be float32 [N, C, H, W], got {self.x.dtype} {tuple(self.x.shape)}"
            )
        if self.y.dtype != torch.int64 or self.y.dim() != 1 or len(self.y) != len(self.x):
            raise ValueError(
                f"y must be int64 [{len(self.x)}], got {self.y.dtype} {tuple(self.y.shape)}"
            )
        if self.source is not None and (
            self.source.dtype != torch.int64 or self.source.shape != self.y.shape
        ):
            raise ValueError(
                f"source must be None or int64 [{len(self.y)}], got {self.source.dtype} "
                f"{tuple(self.source.shape)}"
            )
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")

    def __len__(self) -> int:
        return len(self.y)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one sample."""
        c, h, w = self.x.shape[1:]
        return int(c), int(h), int(w)

    def subset(self, indices: np.ndarray | torch.Tensor | Sequence[int]) -> ArrayDataset:
        """The samples at ``indices`` (any integer array-like, in the given order)."""
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        source = None if self.source is None else self.source[idx]
        return ArrayDataset(self.x[idx], self.y[idx], self.num_classes, self.name, source)


def from_uint8(
    images: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    name: str,
    mean: Sequence[float],
    std: Sequence[float],
) -> ArrayDataset:
    """Build a data set from uint8 images ``[N, C, H, W]`` (0..255) and integer labels ``[N]``.

    Pixels are scaled to [0, 1], then standardised per channel with ``mean`` and ``std``
    (one value per channel).
    """
    x = torch.from_numpy(np.array(images, dtype=np.uint8)).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64).copy())
    return ArrayDataset(x.sub_(m).div_(s), y, num_classes, name)


def stratified_split(
    labels: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Fixed stratified split: ``(train_idx, test_idx)``, both sorted.

    Each class contributes ``round(test_fraction * count)`` samples to the test side, chosen by
    a generator seeded with ``seed`` (numpy's PCG64, stable across versions).
    """
    rng = np.random.default_rng(seed)
    test = []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        test.append(members[: int(round(test_fraction * len(members)))])
    test_idx = np.sort(np.concatenate(test))
    train_idx = np.setdiff1d(np.arange(len(labels)), test_idx)
    return train_idx, test_idx


def select_classes(
    data: ArrayDataset, classes: list[int] | None, field: str = "data.classes"
) -> ArrayDataset:
    """The samples of ``data`` whose label is in ``classes`` (all of them for None); labels
    keep their values (digits 5–9 stay 5–9 of 10 classes)."""
    if classes is None:
        return data
    bad = [c for c in classes if c >= data.num_classes]
    if bad:
        raise FedtierError(
            f"{field}: class {bad[0]} does not exist in data set '{data.name}' "
            f"(classes 0..{data.num_classes - 1})"
        )
    keep = torch.isin(data.y, torch.tensor(classes, dtype=data.y.dtype))
    return data.subset(torch.nonzero(keep).flatten())
