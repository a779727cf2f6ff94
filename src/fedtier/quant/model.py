"""Which tensors of a model are quantized, and post-training quantization of a copy.

The grammar follows torchao's ``quantize_(model, config, filter_fn)``: a :class:`QuantSpec`
(quantizer name + which parameters) applied to *a copy*; the live model is never mutated to be
evaluated.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from fedtier.quant.bnstats import bit_buffers, use_bit_stats
from fedtier.quant.quantizers import FULL_PRECISION, Quantizer, get_quantizer, ste


@dataclass(frozen=True)
class QuantSpec:
    """What to quantize and how.

    quantizer: ``paper`` (QAFed eq. 5–6), ``affine`` or ``affine-channel``.
    params: ``all`` quantizes every floating-point parameter tensor (weights, biases and
        BatchNorm affine parameters, layer by layer as the paper writes w_l) — the default,
        and the setting under which a plain FedAvg BatchNorm CNN collapses at 8 bits;
        ``weights`` quantizes only conv/linear weight matrices (tensors of rank ≥ 2).
    """

    quantizer: str = "paper"
    params: str = "all"

    def fn(self) -> Quantizer:
        return get_quantizer(self.quantizer)

    def selects(self, name: str, tensor: torch.Tensor) -> bool:
        if not tensor.is_floating_point():
            return False
        return self.params == "all" or tensor.dim() >= 2


def quantized_parameters(
    params: Mapping[str, torch.Tensor], spec: QuantSpec, bits: int, *, straight_through: bool
) -> dict[str, torch.Tensor]:
    """Q_b applied to the selected tensors of ``params`` (STE-wrapped for training)."""
    if bits >= FULL_PRECISION:
        return dict(params)
    q = spec.fn()
    out = {}
    for name, w in params.items():
        if not spec.selects(name, w):
            out[name] = w
        elif straight_through:
            out[name] = ste(w, q, bits)
        else:
            out[name] = q(w, bits)
    return out


def forward_quantized(
    model: nn.Module, x: torch.Tensor, spec: QuantSpec, bits: int
) -> torch.Tensor:
    """Forward pass with the model's parameters replaced by Q_b(w) under an STE.

    Gradients flow to the full-precision parameters (QAFed's QAT). BatchNorm layers in train
    mode update the running statistics of precision b when the model has them
    (:mod:`fedtier.quant.bnstats`), otherwise the shared ones.
    """
    if bits >= FULL_PRECISION:
        return model(x)
    params = quantized_parameters(dict(model.named_parameters()), spec, bits, straight_through=True)
    return functional_call(model, {**params, **bit_buffers(model, bits)}, (x,))


def quantize_copy(model: nn.Module, spec: QuantSpec, bits: int) -> nn.Module:
    """Post-training quantization: a deep copy of ``model`` with Q_b applied to its parameters
    (and, when the model keeps BatchNorm statistics per precision, those of the nearest one)."""
    clone = copy.deepcopy(model)
    if bits >= FULL_PRECISION:
        return clone
    use_bit_stats(clone, bits)
    with torch.no_grad():
        params = dict(clone.named_parameters())
        for name, w in quantized_parameters(params, spec, bits, straight_through=False).items():
            params[name].copy_(w)
    return clone


def distinct_levels(model: nn.Module, spec: QuantSpec) -> Iterable[tuple[str, int]]:
    """(name, number of distinct values) per selected tensor; used by tests and reports."""
    for name, w in model.named_parameters():
        if spec.selects(name, w):
            yield name, int(torch.unique(w.detach()).numel())


def grid(
    w: torch.Tensor, spec: QuantSpec, bits: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w and Q_b(w) as [groups, -1] (one group per tensor, per output channel for
    ``affine-channel``) and each group's grid step Δ = range / (2^b − 1) [groups, 1], which is
    the step of the paper's and of the affine quantizers."""
    q = spec.fn()(w, bits)
    if spec.quantizer == "affine-channel" and w.dim() >= 2:
        g, gq = w.reshape(w.shape[0], -1), q.reshape(w.shape[0], -1)
    else:
        g, gq = w.reshape(1, -1), q.reshape(1, -1)
    span = g.max(dim=1, keepdim=True).values - g.min(dim=1, keepdim=True).values
    return g, gq, span / (2**bits - 1)
