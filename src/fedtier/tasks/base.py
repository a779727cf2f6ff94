"""The ClientTask protocol: what a client optimises and how a model is scored.

The round loop only ever calls ``loss`` (inside local training) and ``evaluate``; a
classifier, an autoencoder, and later GAN and diffusion tasks plug in without touching it.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from fedtier.data import ArrayDataset


class ClientTask(Protocol):
    """One task, shared by every client of a run."""

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Scalar training loss on a batch (x [B, ...], y [B])."""
        ...

    def evaluate(self, model: nn.Module, data: ArrayDataset, batch_size: int) -> dict[str, float]:
        """Metrics of ``model`` (already in eval mode) on ``data``; the first key is the headline."""
        ...
