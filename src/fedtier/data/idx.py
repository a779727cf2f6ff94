"""MNIST and Fashion-MNIST from their IDX files (LeCun's format), parsed with numpy."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from fedtier.data.base import ArrayDataset, from_uint8
from fedtier.data.files import locate, require_root
from fedtier.errors import DataError

# IDX type byte -> big-endian numpy dtype (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT").
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

MNIST_HOW = (
    "Download the four IDX files (" + ", ".join(_FILES) + ", optionally .gz) from "
    "http://yann.lecun.com/exdb/mnist/ (mirror https://ossci-datasets.s3.amazonaws.com/mnist/) "
    "or run torchvision.datasets.MNIST(root, download=True), and set data.root to that folder."
)
FASHION_HOW = (
    "Download the four IDX files (" + ", ".join(_FILES) + ", optionally .gz) from "
    "https://github.com/zalandoresearch/fashion-mnist (folder data/fashion) "
    "or run torchvision.datasets.FashionMNIST(root, download=True), and set data.root to that folder."
)


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """The array stored in IDX file ``path`` (gzip-compressed if it ends in ``.gz``).

    Checks the magic number (two zero bytes, a known type byte, ``ndim`` dimensions) and that
    the file holds exactly the data its header announces; a :class:`DataError` otherwise.
    """
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES or raw[3] != ndim:
        expected = f"0x000008{ndim:02x}"
        raise DataError(
            f"{path} is not an IDX file with {ndim} dimension(s): magic number 0x{raw[:4].hex()}, expected {expected}"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(
            f"{path} is truncated: {len(raw)} bytes, shorter than its {header}-byte header"
        )
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    expected_size = header + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected_size:
        problem = "truncated" if len(raw) < expected_size else "too long"
        raise DataError(
            f"{path} is {problem}: header {shape} announces {expected_size} bytes, file holds {len(raw)}"
        )
    return np.frombuffer(raw, dtype, offset=header).reshape(shape)


def load_mnist(root: str | None) -> tuple[ArrayDataset, ArrayDataset]:
    """MNIST, 60,000 train / 10,000 test, ``[N, 1, 28, 28]``, normalised with (0.1307, 0.3081)."""
    return _load_idx_pair("mnist", root, "MNIST", MNIST_HOW, (0.1307,), (0.3081,))


def load_fashion_mnist(root: str | None) -> tuple[ArrayDataset, ArrayDataset]:
    """Fashion-MNIST, 60,000 train / 10,000 test, ``[N, 1, 28, 28]``, normalised with (0.2860, 0.3530)."""
    return _load_idx_pair("fashion-mnist", root, "FashionMNIST", FASHION_HOW, (0.2860,), (0.3530,))


def _load_idx_pair(
    name: str,
    root: str | None,
    torchvision_dir: str,
    how: str,
    mean: tuple[float, ...],
    std: tuple[float, ...],
) -> tuple[ArrayDataset, ArrayDataset]:
    base = require_root(name, root, how)
    paths = locate(name, [base, base / torchvision_dir / "raw"], _FILES, how, gz=True)
    train_x, train_y, test_x, test_y = (paths[f] for f in _FILES)
    return (
        _split(name, train_x, train_y, mean, std),
        _split(name, test_x, test_y, mean, std),
    )


def _split(
    name: str, images_path: Path, labels_path: Path, mean: tuple[float, ...], std: tuple[float, ...]
) -> ArrayDataset:
    images = read_idx(images_path, ndim=3)
    labels = read_idx(labels_path, ndim=1)
    if images.dtype != np.uint8:
        raise DataError(
            f"{images_path}: expected unsigned-byte pixels (IDX type 0x08), found {images.dtype}"
        )
    if len(images) != len(labels):
        raise DataError(
            f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels"
        )
    if len(labels) and not 0 <= labels.min() <= labels.max() <= 9:
        raise DataError(
            f"{labels_path}: labels must lie in 0..9, found {labels.min()}..{labels.max()}"
        )
    return from_uint8(images[:, None], labels, 10, name, mean, std)


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"cannot read {path}: {e}") from e
