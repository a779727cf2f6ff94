"""ArrayDataset, the registry and the two embedded data sets."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from fedtier.data import ArrayDataset, known_datasets, load_dataset
from fedtier.data.base import stratified_split
from fedtier.data.embedded import SPLIT_SEED
from fedtier.errors import UnknownNameError


def _toy(n: int = 6) -> ArrayDataset:
    return ArrayDataset(
        torch.arange(n * 12, dtype=torch.float32).view(n, 3, 2, 2), torch.arange(n) % 3, 3, "toy"
    )


def test_array_dataset_basics() -> None:
    data = _toy()
    assert len(data) == 6
    assert data.input_shape == (3, 2, 2)
    sub = data.subset(np.array([4, 1]))
    assert len(sub) == 2 and sub.name == "toy" and sub.num_classes == 3
    assert torch.equal(sub.x, data.x[[4, 1]]) and sub.y.tolist() == [1, 1]
    assert len(data.subset([])) == 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        data.name = "other"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("x", "y"),
    [
        (torch.zeros(2, 1, 2, 2, dtype=torch.float64), torch.zeros(2, dtype=torch.long)),
        (torch.zeros(2, 4), torch.zeros(2, dtype=torch.long)),
        (torch.zeros(2, 1, 2, 2), torch.zeros(2, dtype=torch.int32)),
        (torch.zeros(2, 1, 2, 2), torch.zeros(3, dtype=torch.long)),
    ],
)
def test_array_dataset_rejects_bad_tensors(x: torch.Tensor, y: torch.Tensor) -> None:
    with pytest.raises(ValueError):
        ArrayDataset(x, y, 2, "bad")


def test_known_datasets() -> None:
    assert known_datasets() == sorted(
        [
            "cifar10",
            "cifar100",
            "digits",
            "fashion-mnist",
            "gtsrb",
            "mnist",
            "mnist5k",
            "mnist5k-16",
            "multisource-mnist",
            "svhn",
        ]
    )


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(UnknownNameError) as err:
        load_dataset("mnsit")
    message = str(err.value)
    assert "'mnsit'" in message and "Did you mean 'mnist'" in message
    assert all(name in message for name in known_datasets())


def test_stratified_split_is_fixed_disjoint_and_balanced() -> None:
    labels = np.repeat(np.arange(10), 500)
    train, test = stratified_split(labels, 0.2, SPLIT_SEED)
    again = stratified_split(labels, 0.2, SPLIT_SEED)
    assert np.array_equal(train, again[0]) and np.array_equal(test, again[1])
    assert len(train) == 4000 and len(test) == 1000
    assert not set(train) & set(test)
    assert np.bincount(labels[test]).tolist() == [100] * 10


def test_mnist5k() -> None:
    train, test = load_dataset("mnist5k")
    assert (len(train), len(test)) == (4000, 1000)
    assert train.x.shape == (4000, 1, 28, 28) and train.x.dtype == torch.float32
    assert train.y.dtype == torch.int64 and train.num_classes == 10 and train.name == "mnist5k"
    assert torch.bincount(test.y).tolist() == [100] * 10
    pixels = train.x * 0.3081 + 0.1307  # undo the MNIST normalisation
    assert pixels.min().item() == pytest.approx(0.0, abs=1e-6)
    assert pixels.max().item() == pytest.approx(1.0, abs=1e-6)
    assert abs(train.x.mean().item()) < 0.1


def test_digits_is_standardised_and_independent_of_seed() -> None:
    train, test = load_dataset("digits", seed=0)
    _, test_again = load_dataset("digits", seed=5)
    assert len(train) + len(test) == 1797 and 350 <= len(test) <= 370
    assert train.input_shape == (1, 8, 8) and train.num_classes == 10
    assert train.x.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert train.x.std().item() == pytest.approx(1.0, abs=1e-3)
    assert torch.equal(test.x, test_again.x) and torch.equal(test.y, test_again.y)


def test_mnist5k_16_is_mnist5k_downsampled_in_pm1_and_classes_select_labels() -> None:
    import torch.nn.functional as F

    from fedtier.data import load_dataset, select_classes

    small, _ = load_dataset("mnist5k-16")
    full, _ = load_dataset("mnist5k")
    assert small.x.shape == (4000, 1, 16, 16) and torch.equal(small.y, full.y)
    assert small.x.min() == -1 and small.x.max() == 1
    pixels = (full.x * 0.3081 + 0.1307).clamp(0, 1)  # undo the standardisation
    ref = F.interpolate(pixels, size=(16, 16), mode="bilinear", antialias=True) * 2 - 1
    torch.testing.assert_close(small.x, ref.clamp(-1, 1), atol=1e-5, rtol=0)
    five = select_classes(small, [5, 9])
    assert set(five.y.tolist()) == {5, 9} and len(five) == 800
