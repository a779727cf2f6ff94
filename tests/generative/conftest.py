"""Shared fixtures: a private judge cache per test, and a judge whose probabilities the test
chooses (its logits are the input pixels), used through the real scoring functions."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedtier.generative import Judge


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDTIER_CACHE", str(tmp_path / "cache"))


def controlled_judge(num_classes: int) -> Judge:
    """A judge over images [N, 1, 1, C] whose logits are the pixels themselves."""
    linear = nn.Linear(num_classes, num_classes, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.eye(num_classes))
    net = nn.Sequential(nn.Flatten(), linear)
    return Judge(net, num_classes, (1, 1, num_classes), "test", cached=False, train_seconds=0.0)


def images_with_probs(probs: list[list[float]]) -> torch.Tensor:
    """Inputs [N, 1, 1, C] on which a controlled judge outputs exactly ``probs``."""
    p = torch.tensor(probs, dtype=torch.float64)
    return p.log().float().view(len(p), 1, 1, -1)
