"""SVHN (cropped digits) from ``train_32x32.mat`` and ``test_32x32.mat``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.io

from fedtier.data.base import ArrayDataset, from_uint8
from fedtier.data.files import locate, require_root
from fedtier.errors import DataError

SVHN_HOW = (
    "Download train_32x32.mat and test_32x32.mat from http://ufldl.stanford.edu/housenumbers/ "
    "(or run torchvision.datasets.SVHN(root, split='train'/'test', download=True)), "
    "and set data.root to the folder holding them."
)
_MEAN, _STD = (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)


def load_svhn(root: str | None) -> tuple[ArrayDataset, ArrayDataset]:
    """SVHN, 73,257 train / 26,032 test, ``[N, 3, 32, 32]``, per-channel standardised; label 10 -> 0."""
    base = require_root("svhn", root, SVHN_HOW)
    files = locate("svhn", [base, base / "svhn"], ("train_32x32.mat", "test_32x32.mat"), SVHN_HOW)
    return (
        from_uint8(*_read_mat(files["train_32x32.mat"]), 10, "svhn", _MEAN, _STD),
        from_uint8(*_read_mat(files["test_32x32.mat"]), 10, "svhn", _MEAN, _STD),
    )


def _read_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images ``[N, 3, 32, 32]`` uint8 and labels ``[N]`` in 0..9 from one SVHN .mat file."""
    try:
        mat = scipy.io.loadmat(path)
    except (
        Exception
    ) as e:  # scipy raises ValueError, OSError, IndexError, MatReadError... on bad files
        raise DataError(f"cannot read {path} as a MATLAB file: {type(e).__name__}: {e}") from e
    if "X" not in mat or "y" not in mat:
        raise DataError(
            f"{path}: expected variables 'X' and 'y', found {sorted(k for k in mat if not k.startswith('__'))}"
        )
    x, y = np.asarray(mat["X"]), np.asarray(mat["y"]).ravel().astype(np.int64)
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.shape[3] != len(y):
        raise DataError(
            f"{path}: 'X' must be uint8 [32, 32, 3, N] matching {len(y)} labels, found {x.dtype} {x.shape}"
        )
    if len(y) and not 0 <= y.min() <= y.max() <= 10:
        raise DataError(
            f"{path}: labels must lie in 1..10 (10 stands for digit 0), found {y.min()}..{y.max()}"
        )
    return x.transpose(3, 2, 0, 1), np.where(y == 10, 0, y)
