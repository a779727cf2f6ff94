"""multisource-mnist: three sources of the same digits, each with its source id."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits as sklearn_digits

from fedtier.data import load_dataset
from fedtier.data.multisource import SOURCES


@pytest.fixture(scope="module")
def data():
    return load_dataset("multisource-mnist"), load_dataset("mnist5k"), load_dataset("digits")


def _pixels(x: torch.Tensor) -> torch.Tensor:
    return x * 0.3081 + 0.1307  # MNIST standardisation undone: [0, 1]


def bilinear_numpy(img: np.ndarray, size: int) -> np.ndarray:
    """Half-pixel-centre bilinear resize (align_corners=False), written out by hand."""
    n = img.shape[0]
    src = np.clip((np.arange(size) + 0.5) * n / size - 0.5, 0, n - 1)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, n - 1)
    w = src - lo
    rows = img[lo] * (1 - w)[:, None] + img[hi] * w[:, None]
    return rows[:, lo] * (1 - w)[None, :] + rows[:, hi] * w[None, :]


def test_shapes_sources_and_splits(data):
    (train, test), (m_train, m_test), (d_train, d_test) = data
    assert SOURCES == ("mnist", "digits", "mnist-inverted")
    for split, m, d in ((train, m_train, d_train), (test, m_test, d_test)):
        assert split.x.shape[1:] == (1, 28, 28) and split.num_classes == 10
        assert split.source is not None
        counts = torch.bincount(split.source).tolist()
        assert counts == [len(m), len(d), len(m)]
        for s in range(3):  # every source holds every digit, with its labels
            assert set(split.y[split.source == s].tolist()) == set(range(10))
        torch.testing.assert_close(split.y[split.source == 0], m.y)
        torch.testing.assert_close(split.y[split.source == 1], d.y)
        torch.testing.assert_close(split.y[split.source == 2], m.y)


def test_sources_share_mnists_value_range_and_are_what_they_claim(data):
    (train, _), (m_train, _), _ = data
    for s in range(3):
        p = _pixels(train.x[train.source == s])
        assert p.min() == pytest.approx(0, abs=1e-5) and p.max() == pytest.approx(1, abs=1e-5)
    torch.testing.assert_close(train.x[train.source == 0], m_train.x)
    torch.testing.assert_close(_pixels(train.x[train.source == 2]), 1 - _pixels(m_train.x))
    # sklearn digits: the same split as the 'digits' data set, resized bilinearly to 28×28
    bunch = sklearn_digits()
    got = _pixels(train.x[train.source == 1]).numpy()[:, 0]
    labels = train.y[train.source == 1].numpy()
    for i in (0, 100, 1000):
        matches = [
            j
            for j in np.flatnonzero(bunch.target == labels[i])
            if np.allclose(bilinear_numpy(bunch.images[j] / 16.0, 28), got[i], atol=1e-5)
        ]
        assert matches, f"digits sample {i} is no bilinear resize of an sklearn digit"


def test_subset_keeps_sources_and_loading_is_deterministic(data):
    (train, _), _, _ = data
    again, _ = load_dataset("multisource-mnist")
    assert torch.equal(again.x, train.x) and torch.equal(again.source, train.source)
    sub = train.subset([0, 5000, 9000])
    assert sub.source.tolist() == [0, 1, 2]
