import os
import signal

import pytest
import torch
from torch import nn

from fedtier.config import from_dict

torch.set_num_threads(1)
# the CLI runs arms side by side by default ("auto"); tests run them one at a time unless a
# test asks for more (tests/test_side_by_side.py), so each test starts no arm processes
os.environ.setdefault("FEDTIER_JOBS", "1")


@pytest.fixture(autouse=True)
def _default_sigint():
    """Each test starts with Python's own Ctrl-C handler and leaves it so: a library that
    leaves SIGINT ignored in this process (some simulation engines do) would otherwise make
    every later subprocess inherit the ignoring, and Ctrl-C tests would see no interrupt."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, signal.default_int_handler)


def tiny_config(**overrides):
    """A seconds-long run on sklearn digits: 12 clients, 2 edges, 3 rounds."""
    d = {
        "name": "tiny",
        "seed": 0,
        "data": {"dataset": "digits", "partition": "dirichlet", "alpha": 1.0},
        "topology": {"edges": 2, "clients": 12, "edges_per_round": 2, "clients_per_edge": 3},
        "model": {"name": "cnn-bn", "options": {"width": 0.5, "hidden": 32}},
        "train": {"rounds": 3, "epochs": 1, "batch_size": 16, "lr": 0.1, "momentum": 0.5},
        "quant": {"eval_bits": [32, 8, 4]},
        "eval": {"every": 1},
    }
    for key, value in overrides.items():
        node = d
        *head, last = key.split(".")
        for part in head:
            node = node.setdefault(part, {})
        node[last] = value
    return from_dict(d)


@pytest.fixture
def tiny():
    return tiny_config


class TwoPart(nn.Module):
    """A shared body and a private head: two parameter groups (8×8 digits in, 10 classes)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU())
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(self.body(x))
