"""Data sets by name: ``load_dataset("mnist5k")`` -> ``(train, test)``."""

from __future__ import annotations

from collections.abc import Callable

from fedtier.data.base import ArrayDataset
from fedtier.data.cifar import load_cifar10, load_cifar100
from fedtier.data.embedded import load_digits, load_mnist5k, load_mnist5k_16
from fedtier.data.gtsrb import load_gtsrb
from fedtier.data.idx import load_fashion_mnist, load_mnist
from fedtier.data.multisource import load_multisource_mnist
from fedtier.data.svhn import load_svhn
from fedtier.errors import UnknownNameError

Loader = Callable[[str | None], tuple[ArrayDataset, ArrayDataset]]

# Embedded sets ignore the root; file-based ones read it (see each loader for the layout).
_LOADERS: dict[str, Loader] = {
    "mnist5k": lambda root: load_mnist5k(),
    "mnist5k-16": lambda root: load_mnist5k_16(),
    "digits": lambda root: load_digits(),
    "multisource-mnist": lambda root: load_multisource_mnist(),
    "mnist": load_mnist,
    "fashion-mnist": load_fashion_mnist,
    "cifar10": load_cifar10,
    "cifar100": load_cifar100,
    "svhn": load_svhn,
    "gtsrb": load_gtsrb,
}


def known_datasets() -> list[str]:
    """Every registered data set name, sorted."""
    return sorted(_LOADERS)


def load_dataset(
    name: str, root: str | None = None, seed: int = 0
) -> tuple[ArrayDataset, ArrayDataset]:
    """Load data set ``name`` as ``(train, test)``.

    ``mnist5k``, ``digits`` and ``multisource-mnist`` (built from those two) ship with
    installed packages; the others are read from their
    standard files under ``root`` (``data.root``), and a :class:`~fedtier.errors.DataError`
    says which files are expected and where to get them. Every split is fixed, so all runs
    share one test set whatever ``seed`` is; ``seed`` is part of the signature so that callers
    need not know which loaders are deterministic.
    """
    loader = _LOADERS.get(name)
    if loader is None:
        raise UnknownNameError("data set", name, _LOADERS)
    return loader(root)
