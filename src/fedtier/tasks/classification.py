"""Classification (cross-entropy, accuracy) and reconstruction (autoencoder, MSE) tasks.

Quantization-aware training is not part of either: :func:`fedtier.tasks.qat` wraps any task
with QAFed's multi-bit loss (eq. 8).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from fedtier.data import ArrayDataset
from fedtier.metrics import MetricSpec
from fedtier.tasks.base import (
    ONE_MODEL,
    Batch,
    Draws,
    Groups,
    LocalUpdate,
    Masked,
    device_of,
)

ACCURACY = MetricSpec("Clean accuracy", "%", higher_is_better=True, scale=100.0, fmt=".1f")
MSE = MetricSpec("Reconstruction MSE", higher_is_better=False, fmt=".4g")


def _supervised(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(batch, tuple) or len(batch) != 2:
        raise TypeError("a supervised task's batch is (x, y)")
    return batch[0], batch[1]


def _unlabelled(batch: Batch) -> torch.Tensor:
    if isinstance(batch, tuple):
        raise TypeError("an unlabelled task's batch is x alone")
    return batch


@dataclass(frozen=True)
class ClassificationTask:
    """Mean cross-entropy of ``model(x)`` [B, K] against y [B]; evaluated by accuracy overall
    (the headline, tabulated per bit width as CDA) and per class."""

    num_classes: int
    groups: Groups = ONE_MODEL
    labelled: bool = field(default=True, init=False)
    headline: str = field(default="accuracy", init=False)
    tables: tuple[str, ...] = field(default=("accuracy",), init=False)
    plain_cross_entropy: bool = field(default=True, init=False)
    local_update: LocalUpdate | None = field(default=None, init=False)

    @property
    def metrics(self) -> Mapping[str, MetricSpec]:
        per_class = {
            f"class_{c}": MetricSpec(f"Accuracy of class {c}", "%", scale=100.0, fmt=".1f")
            for c in range(self.num_classes)
        }
        return {"accuracy": ACCURACY, **per_class}

    @property
    def masked(self) -> Masked:
        return Masked(None, _masked_cross_entropy)

    def loss(self, model: nn.Module, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        x, y = _supervised(batch)
        return F.cross_entropy(model(x), y)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: ArrayDataset, batch_size: int) -> dict[str, float]:
        device = device_of(model)
        preds = torch.cat(
            [
                model(data.x[i : i + batch_size].to(device)).argmax(1).cpu()
                for i in range(0, len(data), batch_size)
            ]
        )
        correct = preds == data.y
        out = {"accuracy": correct.float().mean().item()}
        for c in range(self.num_classes):
            mask = data.y == c
            if mask.any():
                out[f"class_{c}"] = correct[mask].float().mean().item()
        return out


def _masked_cross_entropy(
    model: nn.Module, batch: Batch, mask: torch.Tensor, draws: Draws
) -> torch.Tensor:
    x, y = _supervised(batch)
    return (F.cross_entropy(model(x), y, reduction="none") * mask).sum() / mask.sum()


@dataclass(frozen=True)
class AutoencoderTask:
    """Reconstruction: MSE between ``model(x)`` and x, on unlabelled batches."""

    groups: Groups = ONE_MODEL
    labelled: bool = field(default=False, init=False)
    headline: str = field(default="mse", init=False)
    tables: tuple[str, ...] = field(default=("mse",), init=False)
    plain_cross_entropy: bool = field(default=False, init=False)
    local_update: LocalUpdate | None = field(default=None, init=False)

    @property
    def metrics(self) -> Mapping[str, MetricSpec]:
        return {"mse": MSE}

    @property
    def masked(self) -> Masked:
        return Masked(None, _masked_reconstruction)

    def loss(self, model: nn.Module, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        x = _unlabelled(batch)
        return F.mse_loss(model(x), x)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: ArrayDataset, batch_size: int) -> dict[str, float]:
        device = device_of(model)
        total = 0.0
        for i in range(0, len(data), batch_size):
            x = data.x[i : i + batch_size].to(device)
            total += F.mse_loss(model(x), x, reduction="sum").item()
        return {"mse": total / data.x.numel()}


def _masked_reconstruction(
    model: nn.Module, batch: Batch, mask: torch.Tensor, draws: Draws
) -> torch.Tensor:
    x = _unlabelled(batch)
    per_sample = (model(x) - x).pow(2).flatten(1).mean(1)
    return (per_sample * mask).sum() / mask.sum()
