"""Data sets (embedded and file-based) and their partitions over clients."""

from fedtier.data.base import ArrayDataset, select_classes
from fedtier.data.clients import ClientData
from fedtier.data.partition import partition
from fedtier.data.registry import known_datasets, load_dataset

__all__ = [
    "ArrayDataset",
    "ClientData",
    "known_datasets",
    "load_dataset",
    "partition",
    "select_classes",
]
