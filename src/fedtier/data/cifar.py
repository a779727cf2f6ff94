"""CIFAR-10 and CIFAR-100 from their "python version" pickles.

The pickles are read with an unpickler that only rebuilds numpy arrays, so a tampered file
cannot run code.
"""

from __future__ import annotations

import codecs
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from fedtier.data.base import ArrayDataset, from_uint8
from fedtier.data.files import locate, require_root
from fedtier.errors import DataError

CIFAR10_HOW = (
    "Download cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html and extract it "
    "(or run torchvision.datasets.CIFAR10(root, download=True)), then set data.root to the "
    "cifar-10-batches-py folder or its parent."
)
CIFAR100_HOW = (
    "Download cifar-100-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html and extract it "
    "(or run torchvision.datasets.CIFAR100(root, download=True)), then set data.root to the "
    "cifar-100-python folder or its parent."
)
_CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))

# Python 3 writes bytes in protocol-2 pickles via _codecs.encode; numpy 1.x and 2.x name
# their array rebuilders differently.
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("_codecs", "encode"): codecs.encode,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    **{
        (m, "_reconstruct"): np.zeros(1).__reduce__()[0]
        for m in ("numpy.core.multiarray", "numpy._core.multiarray")
    },
    **{
        (m, "_frombuffer"): np.zeros(1).__reduce_ex__(5)[0]
        for m in ("numpy.core.numeric", "numpy._core.numeric")
    },
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the numpy globals needed to rebuild arrays."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}") from None


def load_cifar10(root: str | None) -> tuple[ArrayDataset, ArrayDataset]:
    """CIFAR-10, 50,000 train / 10,000 test, ``[N, 3, 32, 32]``, per-channel standardised."""
    base = require_root("cifar10", root, CIFAR10_HOW)
    files = locate(
        "cifar10",
        [base / "cifar-10-batches-py", base],
        (*_CIFAR10_TRAIN, "test_batch"),
        CIFAR10_HOW,
    )
    train = [_read_batch(files[f], "labels", 10) for f in _CIFAR10_TRAIN]
    test = _read_batch(files["test_batch"], "labels", 10)
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    return (
        from_uint8(
            np.concatenate([x for x, _ in train]),
            np.concatenate([y for _, y in train]),
            10,
            "cifar10",
            mean,
            std,
        ),
        from_uint8(*test, 10, "cifar10", mean, std),
    )


def load_cifar100(root: str | None) -> tuple[ArrayDataset, ArrayDataset]:
    """CIFAR-100 (fine labels), 50,000 train / 10,000 test, ``[N, 3, 32, 32]``, per-channel standardised."""
    base = require_root("cifar100", root, CIFAR100_HOW)
    files = locate("cifar100", [base / "cifar-100-python", base], ("train", "test"), CIFAR100_HOW)
    mean, std = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
    return (
        from_uint8(*_read_batch(files["train"], "fine_labels", 100), 100, "cifar100", mean, std),
        from_uint8(*_read_batch(files["test"], "fine_labels", 100), 100, "cifar100", mean, std),
    )


def _read_batch(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Images ``[N, 3, 32, 32]`` uint8 and labels ``[N]`` of one pickled batch."""
    try:
        with path.open("rb") as f:
            batch = _ArrayUnpickler(f, encoding="bytes").load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError) as e:
        raise DataError(f"cannot read {path} as a CIFAR python pickle: {e}") from e
    if not isinstance(batch, dict) or b"data" not in batch or label_key.encode() not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise DataError(
            f"{path}: expected a dict with keys b'data' and b'{label_key}', found {keys}"
        )
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[label_key.encode()])
    if (
        data.dtype != np.uint8
        or data.ndim != 2
        or data.shape[1] != 3 * 32 * 32
        or len(data) != len(labels)
    ):
        raise DataError(
            f"{path}: b'data' must be uint8 [N, 3072] matching {len(labels)} labels, "
            f"found {data.dtype} {data.shape}"
        )
    if len(labels) and not 0 <= labels.min() <= labels.max() < num_classes:
        raise DataError(
            f"{path}: labels must lie in 0..{num_classes - 1}, found {labels.min()}..{labels.max()}"
        )
    return data.reshape(-1, 3, 32, 32), labels
