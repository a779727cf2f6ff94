"""Deployment evaluation: the global model post-training quantized at each bit width."""

from __future__ import annotations

import torch
from torch import nn

from fedtier.data import ArrayDataset
from fedtier.quant import QuantSpec, quantize_copy
from fedtier.state import StateLayout
from fedtier.tasks import ClientTask


def evaluate_at_bits(
    model: nn.Module,
    layout: StateLayout,
    w: torch.Tensor,
    task: ClientTask,
    test: ArrayDataset,
    bits: list[int],
    spec: QuantSpec,
    batch_size: int,
) -> dict[str, dict[str, float]]:
    """{bits: metrics} for Q_b(w) at every b in ``bits`` (32 = full precision).

    ``model`` is only a container: w is written into it and each bit width is evaluated on a
    quantized *copy*, never by mutating the model used for training.
    """
    layout.load(model, w)
    out = {}
    for b in bits:
        quantized = quantize_copy(model, spec, b).eval()
        out[str(b)] = task.evaluate(quantized, test, batch_size)
    return out
