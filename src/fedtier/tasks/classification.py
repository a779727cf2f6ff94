"""Classification with optional multi-bit quantization-aware training (QAFed eq. 7–8)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fedtier.data import ArrayDataset
from fedtier.quant import QuantSpec, forward_quantized


@dataclass
class ClassificationTask:
    """Cross-entropy; with ``qat_bits`` non-empty, L(w) = F(w) + Σ_{b∈B} F(Q_b(w)) (eq. 8).

    Algorithm 1 line 11 writes "L ←" inside the loop over B; it means accumulate, as eq. (8)
    states. The quantized passes use the straight-through estimator, so the full-precision
    weights receive the gradient of every term.
    """

    num_classes: int
    qat_bits: tuple[int, ...] = ()
    spec: QuantSpec = QuantSpec()

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        total = F.cross_entropy(model(x), y)
        for bits in self.qat_bits:
            total = total + F.cross_entropy(forward_quantized(model, x, self.spec, bits), y)
        return total

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: ArrayDataset, batch_size: int) -> dict[str, float]:
        device = next(model.parameters()).device
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


@dataclass
class AutoencoderTask:
    """Reconstruction (MSE) — a non-classification task proving the protocol's generality."""

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(model(x), x)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: ArrayDataset, batch_size: int) -> dict[str, float]:
        device = next(model.parameters()).device
        total = 0.0
        for i in range(0, len(data), batch_size):
            x = data.x[i : i + batch_size].to(device)
            total += F.mse_loss(model(x), x, reduction="sum").item()
        return {"mse": total / data.x.numel()}
